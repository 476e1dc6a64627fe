"""Per-token decode time of `--tensor-parallel-size 2` against one rank (issue 30, point 5), taking turns.

Starts two real servers on the same model (`--tensor-parallel-size 1` and `2`) and times, in turns, one greedy
chat of `--short` and one of `--long` tokens on each (`ignore_eos`-free: the tiny model's answers run to the
limit): (long - short) / (long_tokens - short_tokens) is the decode step's time per token, the prefill and HTTP
cancelling out. Prints one JSON line per configuration (the median over `--rounds`).

    python bench/tensor_parallel.py --rounds 5 [--model DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from procs import free_port, wait_ready  # bench/procs.py

ROOT = Path(__file__).resolve().parents[1]


def start(ranks: int, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    flags = ["--model", args.model, "--port", str(port), "--tensor-parallel-size", str(ranks), "--device", args.device]
    flags += ["--max-batch-size", "4", "--context-length", "2048", "--cache-dir", args.cache_dir]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.main", "serve", *flags], cwd=ROOT, stdout=out, stderr=out)
    return proc, f"http://127.0.0.1:{port}"


def timed(base: str, model: str, tokens: int) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": "Count."}], "max_tokens": tokens, "temperature": 0}
    started = time.perf_counter()
    answer = httpx.post(base + "/v1/chat/completions", json=body, timeout=600).json()
    return time.perf_counter() - started, int(answer["usage"]["completion_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "voxtral-bench-tp"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=136)
    parser.add_argument("--sizes", default="1,2")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="voxtral-bench-tp-"))
    servers = {}
    for ranks in (int(s) for s in args.sizes.split(",")):
        servers[ranks] = start(ranks, args, logs / f"tp{ranks}.log")
        wait_ready(*servers[ranks], logs / f"tp{ranks}.log", timeout_s=600)  # one at a time: the loads share the cores
    try:
        per_token: dict[int, list[float]] = {ranks: [] for ranks in servers}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for ranks, (_, base) in servers.items():
                short, n_short = timed(base, args.model, args.short)
                long, n_long = timed(base, args.model, args.long)
                per_token[ranks].append((long - short) / max(1, n_long - n_short))
        for ranks, times in per_token.items():
            kept = times[1:]
            line = {"tensor_parallel_size": ranks, "device": args.device, "model": args.model, "rounds": len(kept)}
            line |= {"ms_per_token_median": round(1000 * statistics.median(kept), 3)}
            line |= {"ms_per_token_min": round(1000 * min(kept), 3)}
            print(json.dumps(line), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGINT)
        for proc, _ in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
