"""Host values onto the model's device without making the host wait.

A copy from pageable host memory to a GPU is synchronous whatever `non_blocking` says: the host waits until
the device has taken the bytes, so every such upload in a decode step is a stall as costly as a read-back.
From pinned (page-locked) memory a `non_blocking` copy is queued on the stream and the host goes on; torch's
pinned allocator keeps the buffer until the copy has run, so the tensor may be dropped at once. The decode
path uploads through here only (tests/unit/test_host_syncs.py counts what it does on a simulated device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(
    values: torch.Tensor | Sequence[int] | Sequence[float], device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`values` as a tensor on `device` (in `dtype`, when given): the host tensor itself on a CPU, else a
    pinned, non-blocking copy (CUDA) or a plain non-blocking one (other accelerators)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if device.type == "cpu" and host.device.type == "cpu":
        return host
    if host.device.type != "cpu":
        return host.to(device, non_blocking=True)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def bind_thread(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (a no-op elsewhere, or when it is already).

    A thread starts on device 0 whatever the model's: pinned host buffers are made there (a CUDA context on
    GPU 0, another process's GPU under `--device cuda:1`), and so are streams and CUDA graphs' capture
    streams. Cheap enough to call at every prefill and step."""
    if device.type == "cuda" and device.index is not None and torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device)
