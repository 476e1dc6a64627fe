"""Throughput and latency of voxtral-server, side by side with its baselines, in one run.

(a) our server, batching on; (b) our server with --max-batch-size 1; (c) the ceiling: the same
requests straight through `model.generate` in-process, in static batches of the same size, no
HTTP and no queue; (d) the peer: `transformers serve` on the same model directory (chat with a
local audio path only: it cannot do transcription, base64 audio or batching for Voxtral).

Every request generates exactly --tokens tokens so the runs are comparable (the tiny random
model never stops by itself). Prints a table and the ratios the engine issue targets.

    python bench/throughput.py --n 256 --concurrency 1,8,32,64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
JFK = ROOT.parent / "shared" / "audio" / "jfk.wav"
JFK_SECONDS = 11.0


@dataclass
class Run:
    label: str
    workload: str
    concurrency: int
    n: int
    wall_s: float
    latencies: list[float]
    failures: int

    @property
    def rps(self) -> float:
        return self.n / self.wall_s

    def pct(self, q: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    def row(self) -> dict[str, Any]:
        return {
            "config": self.label,
            "workload": self.workload,
            "concurrency": self.concurrency,
            "requests": self.n,
            "failures": self.failures,
            "req_per_s": round(self.rps, 2),
            "audio_s_per_s": round(self.rps * JFK_SECONDS, 1),
            "p50_s": round(self.pct(0.5), 3),
            "p99_s": round(self.pct(0.99), 3),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(cmd: list[str], url: str, ready_path: str, log: Path):  # type: ignore[no-untyped-def]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + ready_path, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited; see {log}")
                time.sleep(0.5)
            else:
                raise RuntimeError(f"{cmd} never became ready; see {log}")
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)


def our_server(model_dir: Path, tokens: int, batch: int, prefill_tokens: int, log: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    cmd = [sys.executable, "-m", "app.main", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--max-batch-size", str(batch), "--max-queue", "4096", "--transcription-min-tokens", str(tokens)]
    cmd += ["--transcription-tokens-per-audio-s", "0", "--max-batch-tokens", str(min(prefill_tokens, 400 * batch))]
    return process(cmd, f"http://127.0.0.1:{port}", "/ready", log), f"http://127.0.0.1:{port}"


def request_factory(workload: str, tokens: int, model: str, local_path: bool = False) -> Any:
    audio = JFK.read_bytes()
    b64 = base64.b64encode(audio).decode()
    part = (
        {"type": "audio_url", "audio_url": {"url": str(JFK)}}
        if local_path
        else {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
    )
    chat = {
        "model": model,
        "max_tokens": tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is said?"}]}],
    }

    async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
        if workload == "transcription" or (workload == "mix" and i % 2 == 0):
            files = {"file": ("jfk.wav", audio, "audio/wav")}
            return await client.post("/v1/audio/transcriptions", files=files, data={"model": model})
        return await client.post("/v1/chat/completions", json=chat)

    return send


async def _load(url: str, send: Any, n: int, concurrency: int) -> tuple[float, list[float], int]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await send(client, 1)  # warm: connection and first-request costs out of the timing
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        failures = 0

        async def one(i: int) -> None:
            nonlocal failures
            async with gate:
                started = time.perf_counter()
                response = await send(client, i)
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - started, latencies, failures


def load(label: str, url: str, send: Any, workload: str, n: int, concurrency: int) -> Run:
    wall, latencies, failures = asyncio.run(_load(url, send, n, concurrency))
    run = Run(label, workload, concurrency, n, wall, latencies, failures)
    print(json.dumps(run.row()), flush=True)
    return run


def ceiling(model_dir: Path, tokens: int, n: int, batch: int) -> Run:
    """(c): static batches straight through processor + model.generate, in this process."""
    import soundfile as sf
    import torch
    from transformers import AutoProcessor, VoxtralForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = VoxtralForConditionalGeneration.from_pretrained(model_dir).eval()
    audio, _ = sf.read(JFK, dtype="float32")
    latencies: list[float] = []

    def one_batch(size: int) -> float:
        started = time.perf_counter()
        inputs = processor.apply_transcription_request(
            audio=[audio] * size, model_id=str(model_dir), sampling_rate=16000, format=["wav"] * size
        )
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - started

    one_batch(1)
    started = time.perf_counter()
    done = 0
    while done < n:
        size = min(batch, n - done)
        latencies += [one_batch(size)] * size
        done += size
    run = Run("c_ceiling_inprocess", "transcription", batch, n, time.perf_counter() - started, latencies, 0)
    print(json.dumps(run.row()), flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=3200,
        help="our server's prefill budget: 3200 (8 jfk.wav rows a prefill) measured best on 2 CPU cores; "
        "larger prefills run the audio encoder out of cache there. On a GPU pass the server default, 32768.",
    )
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-only", action="store_true", help="only (d) and (a) on its chat workload")
    parser.add_argument("--out", type=Path, default=None, help="write every row as JSON here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="voxtral-bench-"))
    sys.path.insert(0, str(ROOT))
    from app.model.tiny import build_tiny_model

    model_dir = build_tiny_model(work / "tiny")
    model = str(model_dir)
    rows: list[Run] = []
    for label, batch in () if args.peer_only else (("a_batching", max(levels)), ("b_batch_size_1", 1)):
        ctx, url = our_server(model_dir, args.tokens, batch, args.max_batch_tokens, work / f"{label}.log")
        with ctx:
            for workload in ("transcription", "mix"):
                for c in levels:
                    rows.append(load(label, url, request_factory(workload, args.tokens, model), workload, args.n, c))
    for c in [] if args.peer_only else levels:
        rows.append(ceiling(model_dir, args.tokens, args.n, c))
    if not args.skip_peer:
        rows += peer(model_dir, args, levels, work)
    summarise(rows, levels)
    if args.out:
        args.out.write_text(json.dumps([r.row() for r in rows], indent=1))


def peer(model_dir: Path, args: argparse.Namespace, levels: list[int], work: Path) -> list[Run]:
    """(d) transformers serve vs (a) on the one workload it can do: chat with a local audio path."""
    rows = []
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--port", str(port)]
    cmd += ["--device", "cpu"]
    url = f"http://127.0.0.1:{port}"
    with process(cmd, url, "/health", work / "peer.log"):
        send = request_factory("chat", args.tokens, str(model_dir), local_path=True)
        for c in levels:
            rows.append(load("d_transformers_serve", url, send, "chat_local_path", args.n, c))
        rows += [probe_peer(url, str(model_dir))]
    ctx, ours = our_server(model_dir, args.tokens, max(levels), args.max_batch_tokens, work / "a_chat.log")
    with ctx:
        send = request_factory("chat", args.tokens, str(model_dir))
        for c in levels:
            rows.append(load("a_batching", ours, send, "chat_local_path", args.n, c))
    return rows


def probe_peer(url: str, model: str) -> Run:
    """What the peer cannot do: record the status codes it answers."""
    b64 = base64.b64encode(JFK.read_bytes()).decode()
    part = {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [part]}]}
    files = {"file": ("jfk.wav", JFK.read_bytes(), "audio/wav")}
    with httpx.Client(base_url=url, timeout=60) as client:
        t = _status(lambda: client.post("/v1/audio/transcriptions", files=files, data={"model": model}))
        c = _status(lambda: client.post("/v1/chat/completions", json=body))
    print(json.dumps({"peer_transcription_status": t, "peer_base64_chat_status": c}), flush=True)
    return Run(f"d_probe transcription={t} base64_chat={c}", "probe", 0, 1, 1.0, [], int(t != "200") + int(c != "200"))


def _status(send: Any) -> str:
    try:
        return str(send().status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def summarise(rows: list[Run], levels: list[int]) -> None:
    def find(label: str, workload: str, c: int) -> Run | None:
        return next((r for r in rows if r.label == label and r.workload == workload and r.concurrency == c), None)

    print("\nratios (throughput unless noted):")
    for c in levels:
        a, b, ceil = find("a_batching", "transcription", c), find("b_batch_size_1", "transcription", c), None
        ceil = find("c_ceiling_inprocess", "transcription", c)
        d, a_chat = find("d_transformers_serve", "chat_local_path", c), find("a_batching", "chat_local_path", c)
        parts = [f"c={c}"]
        if a and b:
            parts.append(f"(a)/(b)={a.rps / b.rps:.2f}")
        if a and ceil:
            parts.append(f"(a)/(c)={a.rps / ceil.rps:.2f}")
            parts.append(
                f"p50 latency (a)/(c)={statistics.median(a.latencies) / statistics.median(ceil.latencies):.2f}"
            )
        if a_chat and d:
            parts.append(f"(a)/(d) chat={a_chat.rps / d.rps:.2f}")
        print("  " + "  ".join(parts))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
