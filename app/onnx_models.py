"""The ONNX models the server ships (Smart Turn v3, GTCRN), each loaded once per process under onnxruntime.

One thread per session run: the models' inputs are a frame or a few seconds of audio, too small to split
across threads (docs/PERF.md, audio and VAD), and the prep threads already run sessions side by side.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path
from typing import Any

_lock = threading.Lock()


def cpu_session(path: Path) -> Any:
    """The shared onnxruntime session of the model at `path` (thread-safe to run concurrently)."""
    with _lock:
        return _load(path)


@cache
def _load(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
