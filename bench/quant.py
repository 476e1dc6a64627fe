"""Weight bytes, peak memory at load and decode step time per `--quantization` format (issue 30), on a CPU.

Two random checkpoints go through the server's own `load_model` (`from_pretrained` with the format's config):
the tiny test model, and a wide one: Voxtral Mini's widths (hidden 3072, intermediate 8192, 32 heads, 8 KV
heads) with 4 decoder and 2 encoder layers and a 32,768-token vocabulary (bench/random_mini.py's builder),
saved in bfloat16 and loaded in float32 like any checkpoint on a CPU. Each format loads in its own process:

- weight bytes: `loaded_bytes` (app/model/compute/footprint.py), by part, from the loaded tensors;
- peak memory at load: the process's peak resident set (VmHWM, reset just before) less its resident set
  before the load (after the heavy imports): what the load itself took at its worst, quantizing included.
  RSS, not tracemalloc: torch's allocations are outside Python's allocator;
- decode step time (wide model): the parent asks each format's process in turn (round robin, `--rounds`) for
  `--steps` `BatchGenerator.step`s of a batch of `--rows` text rows and takes the median of its thread's CPU
  time and of the wall time per step; the ratio to none is taken within each round.

fp8 needs a CUDA GPU of compute capability 8.9: on a CPU its refusal is printed instead.

    python bench/quant.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ("none", "int8", "bitsandbytes", "fp8")
WIDE_TEXT = {"num_hidden_layers": 4, "vocab_size": 32768, "max_position_embeddings": 2048}
WIDE_AUDIO = {"num_hidden_layers": 2}


def _status_bytes(field: str) -> int:
    """A /proc/self/status size (VmRSS, VmHWM: the peak resident set since `_reset_peak`)."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Linux: VmHWM restarts from the current resident set (ru_maxrss cannot: it survives even exec)."""
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def worker(model: str, quantization: str, rows: int) -> None:
    """Load `model` quantized, report its bytes; then answer each line "N" on stdin with N timed steps."""
    import torch

    from app.config import Settings
    from app.model.compute.features import LogMel
    from app.model.compute.footprint import loaded_bytes
    from app.model.compute.generate import BatchGenerator, Row
    from app.model.compute.loader import ModelLoadError, load_model, preflight
    from app.types import SamplingParams

    torch.set_num_threads(1)
    settings = Settings(model=model, device="cpu", quantization=quantization)  # type: ignore[arg-type]
    try:
        preflight(settings)
    except ModelLoadError as exc:
        print(json.dumps({"refused": str(exc)}), flush=True)
        return
    import bitsandbytes  # noqa: F401  # imported before the measure: the load's bytes only
    import torchao.quantization  # noqa: F401
    import transformers  # noqa: F401

    _reset_peak()
    before = _status_bytes("VmRSS")
    loaded = load_model(settings)
    peak = _status_bytes("VmHWM") - before
    parts = loaded_bytes(loaded.model)
    print(json.dumps({"parts": parts.__dict__, "total": parts.total, "load_peak": peak}), flush=True)
    gen = BatchGenerator(loaded.model, pad_token_id=11, log_mel=LogMel(loaded.processor.feature_extractor, 3000))
    ids = [[1, 3] + [1000 + (7 * i + j) % 1500 for j in range(60)] + [4] for i in range(rows)]
    prompts = [Row(row, [], SamplingParams()) for row in ids]
    with torch.inference_mode():
        state, _ = gen.prefill(prompts)
        tokens = torch.full((rows,), 1100)
        for _ in range(3):
            gen.step(state, tokens)
        for line in sys.stdin:
            cpu, wall = [], []
            for _ in range(int(line)):
                c0, w0 = time.thread_time(), time.perf_counter()
                gen.step(state, tokens)
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - w0)
            print(json.dumps({"cpu": statistics.median(cpu), "wall": statistics.median(wall)}), flush=True)


def _start(model: Path, quantization: str, rows: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", str(model), "--quantization", quantization, "--rows", str(rows)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _reply(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"worker exited with {proc.wait()}")


def build_models(root: Path) -> dict[str, Path]:
    import torch

    from app.model.tiny import build_tiny_model
    from bench.random_mini import model as random_model

    wide = root / "wide"
    random_model(wide, "cpu", torch.bfloat16, text=WIDE_TEXT, audio=WIDE_AUDIO).save_pretrained(wide)
    return {"tiny": build_tiny_model(root / "tiny"), "wide": wide}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quantization", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.quantization, args.rows)
        return
    with tempfile.TemporaryDirectory() as tmp:
        live = _load_table(build_models(Path(tmp)), args.rows)
        try:
            _step_table(live, args.rounds, args.steps)
        finally:
            for proc in live.values():
                proc.communicate()


def _load_table(models: dict[str, Path], rows: int) -> dict[str, subprocess.Popen[str]]:
    """Print each model's bytes and load peak per format; return the wide model's workers, still running."""
    print("| model | format | encoder | projector | decoder | embedding | head | total MiB | load peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    live: dict[str, subprocess.Popen[str]] = {}
    for name, path in models.items():
        for fmt in FORMATS:
            proc = _start(path, fmt, rows)
            got = _reply(proc)
            if "refused" in got:
                print(f"| {name} | {fmt} | refused: {got['refused'][:60]}... |||||||")
                proc.communicate()
                continue
            cells = [_mib(got["parts"][k]) for k in ("encoder", "projector", "decoder", "embedding", "head")]
            cells += [_mib(got["total"]), _mib(got["load_peak"])]
            print(f"| {name} | {fmt} | " + " | ".join(cells) + " |")
            if name == "wide":
                live[fmt] = proc
            else:
                proc.communicate()
    return live


def _step_table(live: dict[str, subprocess.Popen[str]], rounds: int, steps: int) -> None:
    """Each format's worker steps in turn, `rounds` times; print the medians and the ratio to none."""
    times: dict[str, list[dict[str, float]]] = {fmt: [] for fmt in live}
    for _ in range(rounds):
        for fmt, proc in live.items():
            assert proc.stdin is not None
            proc.stdin.write(f"{steps}\n")
            proc.stdin.flush()
            times[fmt].append(_reply(proc))
    print("\n| format | step CPU ms (median of rounds) | wall ms | CPU / none (per round, median) |")
    print("| --- | --- | --- | --- |")
    for fmt, runs in times.items():
        ratio = statistics.median(r["cpu"] / b["cpu"] for r, b in zip(runs, times["none"], strict=True))
        cpu = statistics.median(r["cpu"] for r in runs) * 1e3
        wall = statistics.median(r["wall"] for r in runs) * 1e3
        print(f"| {fmt} | {cpu:.1f} | {wall:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
