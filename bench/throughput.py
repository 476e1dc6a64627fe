"""Throughput and latency of voxtral-server, side by side with its baselines, in one run.

(a) our server, batching on; (b) our server with --max-batch-size 1; (c) the ceiling: the same
requests straight through `model.generate` in-process, in static batches of the same size, no
HTTP and no queue; (d) the peer: `transformers serve` on the same model directory (chat with a
local audio path only: it cannot do transcription, base64 audio or batching for Voxtral).
With --static, also (e): our server with --no-continuous-batching, to measure what admitting
requests between decode steps is worth; the `chat_varied` workload asks for answers of 8 to 120
tokens (64 on average), where a static batch waits for its longest row. With --baseline-src DIR,
also (f): our server run from another source tree (a checkout of an earlier commit), to hold a
change to "no slower than before" in the same rounds.

Per-token work (sampling, grammar masks) is measured on the real 131,072-token vocabulary
(--full-vocab) with the chat workloads `chat` (greedy), `chat_default` (no temperature: the model
card's 0.2 / top_p 0.95), `chat_json` (response_format json_object, greedy), `chat_json_default`
and `chat_tools` (tool_choice required, greedy), `chat_logprobs` (greedy, logprobs with top_logprobs 5),
`chat_logprobs_only` (greedy, logprobs without alternatives) and `chat_n4` (greedy, n=4: four rows
from one prefill); each is compared with `chat` in the same round:

    python bench/throughput.py --full-vocab --workloads chat,chat_default,chat_json,chat_tools \
        --concurrency 32 --n 64 --rounds 3 --skip-ceiling --skip-peer --skip-single

Every request generates exactly --tokens tokens so the runs are comparable (the tiny random
model never stops by itself). The configurations take turns: all servers stay up, and each
round runs (a), (b) and (c) one after the other at one concurrency, so a machine that speeds up
or slows down mid-run (shared CPUs drift by 20 % or more within minutes) moves all of them
alike. Each ratio is taken within a round; the summary gives the median over the rounds and
their range. The load generator sends request bodies encoded once, so that on a machine shared
with the server it takes as little CPU as it can (a remote client would take none).

    python bench/throughput.py --n 256 --concurrency 1,8,32,64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from procs import free_port, wait_ready  # bench/procs.py

ROOT = Path(__file__).resolve().parents[1]
JFK = ROOT / "tests" / "data" / "jfk.wav"
OURS, SINGLE, CEILING, PEER = "a_batching", "b_batch_size_1", "c_ceiling_inprocess", "d_transformers_serve"
STATIC, BASELINE = "e_static_batching", "f_baseline_src"
CHAT_KINDS: dict[str, dict[str, Any]] = {
    "chat": {"temperature": 0},
    "chat_default": {},
    "chat_json": {"temperature": 0, "response_format": {"type": "json_object"}},
    "chat_json_default": {"response_format": {"type": "json_object"}},
    "chat_logprobs": {"temperature": 0, "logprobs": True, "top_logprobs": 5},
    "chat_logprobs_only": {"temperature": 0, "logprobs": True},
    "chat_n4": {"temperature": 0, "n": 4},
    "chat_tools": {
        "temperature": 0,
        "tool_choice": "required",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                        "required": ["city", "days"],
                    },
                },
            }
        ],
    },
}
"""Chat workloads: what each adds to the request body (64 tokens of chat with the audio and a question)."""
CHAT_KINDS["chat_tools_auto"] = {**CHAT_KINDS["chat_tools"], "tool_choice": "auto"}
"""The same 491-token prompt as chat_tools (the tool adds 106 tokens to chat's 385), unconstrained until a call
starts: what the longer prompt costs apart from the grammar."""
VARIED_TOKENS = (8, 120, 16, 112, 32, 96, 48, 80)
"""max_tokens of the chat_varied requests, in turn: 64 on average, like every other workload."""

Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


@dataclass
class Run:
    label: str
    workload: str
    concurrency: int
    round: int
    n: int
    wall_s: float
    latencies: list[float]
    failures: int
    tokens: int = 0
    """Generated per request: tokens/s is req/s times this."""
    audio_s: float = 0.0
    """Seconds of audio per request: audio-s/s is req/s times this."""
    generated: int | None = None
    """Completion tokens in all, from the answers' usage (constrained answers may end early)."""
    answers_with_usage: int = 0
    steps: int | None = None
    """Our servers: decode steps the run took (one decoder forward over every running row each)."""
    rows_per_step: float | None = None

    @property
    def rps(self) -> float:
        return self.n / self.wall_s

    def row(self) -> dict[str, Any]:
        return {
            "config": self.label,
            "workload": self.workload,
            "concurrency": self.concurrency,
            "round": self.round,
            "requests": self.n,
            "failures": self.failures,
            "req_per_s": round(self.rps, 2),
            "audio_s_per_s": round(self.rps * self.audio_s, 1),
            "tokens_per_s": round(
                self.generated / self.wall_s if self.answers_with_usage == self.n else self.rps * self.tokens
            ),
            "mean_completion_tokens": None
            if self.generated is None
            else round(self.generated / max(1, self.answers_with_usage), 1),
            "p50_s": round(pct(self.latencies, 0.5), 3),
            "p99_s": round(pct(self.latencies, 0.99), 3),
            "decode_steps": self.steps,
            "rows_per_step": None if self.rows_per_step is None else round(self.rows_per_step, 1),
        }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextmanager
def process(
    cmd: list[str], url: str, ready_path: str, log: Path, cwd: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            wait_ready(proc, url, log, path=ready_path, timeout_s=180)
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)


def our_server(
    stack: ExitStack,
    model_dir: Path,
    tokens: int,
    batch: int,
    prefill_tokens: int,
    log: Path,
    *extra: str,
    src: Path = ROOT,
) -> str:
    port = free_port()
    cmd = [sys.executable, "-m", "app.main", "serve", "--model", str(model_dir), "--port", str(port), *extra]
    cmd += ["--max-batch-size", str(batch), "--max-queue", "4096", "--transcription-min-tokens", str(tokens)]
    cmd += ["--transcription-tokens-per-audio-s", "0", "--max-batch-tokens", str(min(prefill_tokens, 400 * batch))]
    cmd += ["--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    stack.enter_context(process(cmd, url, "/ready", log, cwd=src))
    return url


class Bodies:
    """Every request body encoded once: the load generator then only writes bytes."""

    def __init__(self, tokens: int, model: str, path: Path) -> None:
        import soundfile as sf

        self.seconds = float(sf.info(path).duration)
        audio = path.read_bytes()
        files = {"file": (path.name, audio, "audio/wav")}
        upload = httpx.Request("POST", "http://x/", files=files, data={"model": model})
        self.upload = upload.read()
        self.upload_type = upload.headers["content-type"]
        b64 = {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}
        self.chat = {kind: self._chat(model, tokens, b64, extra) for kind, extra in CHAT_KINDS.items()}
        self.chat_path = self._chat(model, tokens, {"type": "audio_url", "audio_url": {"url": str(path)}})
        self.chat_varied = [self._chat(model, n, b64) for n in VARIED_TOKENS]

    @staticmethod
    def _chat(model: str, tokens: int, part: dict[str, Any], extra: dict[str, Any] | None = None) -> bytes:
        text = {"type": "text", "text": "What is said?"}
        body = {"model": model, "max_tokens": tokens, **(CHAT_KINDS["chat"] if extra is None else extra)}
        body["messages"] = [{"role": "user", "content": [part, text]}]
        return json.dumps(body).encode()

    def sender(self, workload: str, local_path: bool = False) -> Send:
        """transcription (multipart), mix (alternating with chat), chat_varied (chat of 8 to 120 tokens),
        and the CHAT_KINDS; chat audio as base64, or as a local file path (`local_path`: the only form the
        peer takes, and one our server refuses)."""
        json_type = {"content-type": "application/json"}
        upload_type = {"content-type": self.upload_type}
        chat = self.chat_path if local_path else self.chat.get(workload, self.chat["chat"])

        async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
            if workload == "transcription" or (workload == "mix" and i % 2 == 0):
                return await client.post("/v1/audio/transcriptions", content=self.upload, headers=upload_type)
            body = self.chat_varied[i % len(self.chat_varied)] if workload == "chat_varied" else chat
            return await client.post("/v1/chat/completions", content=body, headers=json_type)

        return send


async def _load(url: str, send: Send, n: int, concurrency: int) -> tuple[float, list[float], int, list[int]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(send(client, i) for i in range(min(concurrency, 8))))  # warm connections
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        failures = 0
        generated: list[int] = []

        async def one(i: int) -> None:
            nonlocal failures
            async with gate:
                started = time.perf_counter()
                response = await send(client, i)
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200
                usage = response.json().get("usage") if response.status_code == 200 else None
                if isinstance(usage, dict) and "completion_tokens" in usage:
                    generated.append(int(usage["completion_tokens"]))

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - started, latencies, failures, generated


def load(label: str, url: str, send: Send, workload: str, args: argparse.Namespace, c: int, round_: int) -> Run:
    before = decode_steps(url) if label != PEER else None
    wall, latencies, failures, generated = asyncio.run(_load(url, send, args.n, c))
    run = Run(label, workload, c, round_, args.n, wall, latencies, failures, args.tokens, args.seconds)
    run.generated, run.answers_with_usage = (sum(generated), len(generated)) if generated else (None, 0)
    if before is not None:
        rows, steps = (after - b for after, b in zip(decode_steps(url), before, strict=True))
        run.steps, run.rows_per_step = int(steps), rows / max(steps, 1)
    print(json.dumps(run.row()), flush=True)
    return run


class Ceiling:
    """(c): static batches straight through processor + model.generate, in this process."""

    def __init__(self, model_dir: Path, tokens: int, device: str, path: Path) -> None:
        import soundfile as sf
        import torch
        from transformers import AutoProcessor, VoxtralForConditionalGeneration

        self.model_dir, self.tokens, self.device = model_dir, tokens, device
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = VoxtralForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype, device_map=device)
        self.model.eval()
        self.audio, rate = sf.read(path, dtype="float32")
        self.seconds = len(self.audio) / rate
        self._batch(1)  # warm

    def _batch(self, size: int) -> float:
        import torch

        started = time.perf_counter()
        inputs = self.processor.apply_transcription_request(
            audio=[self.audio] * size, model_id=str(self.model_dir), sampling_rate=16000, format=["wav"] * size
        ).to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=self.tokens, min_new_tokens=self.tokens, do_sample=False)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def run(self, n: int, batch: int, round_: int) -> Run:
        latencies: list[float] = []
        started = time.perf_counter()
        done = 0
        while done < n:
            size = min(batch, n - done)
            latencies += [self._batch(size)] * size
            done += size
        wall = time.perf_counter() - started
        run = Run(CEILING, "transcription", batch, round_, n, wall, latencies, 0, self.tokens, self.seconds)
        print(json.dumps(run.row()), flush=True)
        return run

    def peak_gpu_memory(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if self.device.startswith("cuda") else None


def ours_and_ceiling(model_dir: Path, bodies: Bodies, args: argparse.Namespace, work: Path) -> list[Run]:
    """(a), (b) and (c) in turns: for each concurrency, `rounds` rounds of a, b (each workload), c;
    with --static, (e) after (b)."""
    rows: list[Run] = []
    # (a) has a place for every row: `n` choices of one request are n rows of the batch.
    choices = max(CHAT_KINDS.get(w, {}).get("n", 1) for w in args.workloads)
    configs: list[tuple[str, int, tuple[str, ...], Path]] = [(OURS, max(args.levels) * choices, (), ROOT)]
    if not args.skip_single:
        configs.append((SINGLE, 1, (), ROOT))
    if args.static:
        configs.append((STATIC, max(args.levels), ("--no-continuous-batching",), ROOT))
    if args.baseline_src or args.baseline_flags:
        flags = tuple(shlex.split(args.baseline_flags or ""))
        configs.append((BASELINE, max(args.levels) * choices, flags, (args.baseline_src or ROOT).resolve()))
    with ExitStack() as stack:
        servers = {
            label: our_server(
                stack, model_dir, args.tokens, batch, args.max_batch_tokens, work / f"{label}.log", *x, src=src
            )
            for label, batch, x, src in configs
        }
        ceiling = None if args.skip_ceiling else Ceiling(model_dir, args.tokens, args.device, args.audio)
        for c in args.levels:
            for r in range(args.rounds):
                for workload in args.workloads:
                    for label, url in servers.items():
                        rows.append(load(label, url, bodies.sender(workload), workload, args, c, r))
                if ceiling:
                    rows.append(ceiling.run(args.n, c, r))
        peaks = {label: gpu_memory_peak(url) for label, url in servers.items()}
        peaks[CEILING] = ceiling.peak_gpu_memory() if ceiling else None
        print(json.dumps({"gpu_memory_peak_gib": peaks}), flush=True)
    return rows


def decode_steps(url: str) -> tuple[float, float]:
    """Rows summed over decode steps, and steps, so far: from the voxtral_batch_size histogram. On a GPU a
    step costs about the same at 1 row or 32, so the steps a workload takes are what decoding costs there."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("voxtral_batch_size_"))
    return float(values.get("voxtral_batch_size_sum", 0)), float(values.get("voxtral_batch_size_count", 0))


def gpu_memory_peak(url: str) -> float | None:
    """GiB, from the server's voxtral_gpu_memory_peak_bytes; None without a GPU."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = [
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("voxtral_gpu_memory_peak_bytes{")
    ]
    return round(max(values) / 2**30, 2) if values else None


def peer(model_dir: Path, bodies: Bodies, args: argparse.Namespace, work: Path) -> list[Run]:
    """(d) transformers serve and (a) in turns, on the one workload (d) can do: chat with a local path."""
    rows = []
    with ExitStack() as stack:
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--port", str(port)]
        cmd += ["--device", "cpu"]
        peer_url = f"http://127.0.0.1:{port}"
        stack.enter_context(process(cmd, peer_url, "/health", work / "peer.log"))
        rows.append(probe_peer(peer_url, str(model_dir), args.audio))
        ours = our_server(stack, model_dir, args.tokens, max(args.levels), args.max_batch_tokens, work / "a_chat.log")
        # Same audio, same answer length; ours reads it as base64 (more work), as it reads no local paths.
        theirs, send = bodies.sender("chat", local_path=True), bodies.sender("chat")
        for c in args.levels:
            for r in range(args.rounds):
                rows.append(load(PEER, peer_url, theirs, "chat_local_path", args, c, r))
                rows.append(load(OURS, ours, send, "chat_local_path", args, c, r))
    return rows


def probe_peer(url: str, model: str, path: Path) -> Run:
    """What the peer cannot do: record the status codes it answers."""
    b64 = base64.b64encode(path.read_bytes()).decode()
    part = {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [part]}]}
    files = {"file": (path.name, path.read_bytes(), "audio/wav")}
    with httpx.Client(base_url=url, timeout=60) as client:
        t = _status(lambda: client.post("/v1/audio/transcriptions", files=files, data={"model": model}))
        c = _status(lambda: client.post("/v1/chat/completions", json=body))
    print(json.dumps({"peer_transcription_status": t, "peer_base64_chat_status": c}), flush=True)
    failed = int(t != "200") + int(c != "200")
    return Run(f"d_probe transcription={t} base64_chat={c}", "probe", 0, 0, 1, 1.0, [], failed)


def _status(send: Callable[[], httpx.Response]) -> str:
    try:
        return str(send().status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


# --- summary -------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def summarise(rows: list[Run], levels: list[int]) -> None:
    """Markdown: the median of each configuration over its rounds, then the ratios taken within rounds."""
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for run in rows:
        if run.workload != "probe":
            groups.setdefault((run.label, run.workload, run.concurrency), []).append(run)
    head = "| config | workload | concurrency | rounds | failures | req/s median (range) | audio-s/s | tokens/s "
    print("\n" + head + "| p50 s | p99 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (label, workload, c), runs in groups.items():
        rps = [r.rps for r in runs]
        pooled = [x for r in runs for x in r.latencies]
        print(
            f"| {label} | {workload} | {c} | {len(runs)} | {sum(r.failures for r in runs)} | {_spread(rps)} "
            f"| {statistics.median(rps) * runs[0].audio_s:.1f} | {statistics.median(rps) * runs[0].tokens:.0f} "
            f"| {pct(pooled, 0.5):.3f} | {pct(pooled, 0.99):.3f} |"
        )
    print("\nRatios within each round: median over the rounds (lowest-highest).\n")
    print("| concurrency | (a)/(b) transcription | (a)/(b) mix | (a)/(c) | p50 latency (a)/(c) | (a)/(d) chat |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in levels:
        cells = [
            _spread(_ratios(groups, (OURS, "transcription", c), (SINGLE, "transcription", c), _rps)),
            _spread(_ratios(groups, (OURS, "mix", c), (SINGLE, "mix", c), _rps)),
            _spread(_ratios(groups, (OURS, "transcription", c), (CEILING, "transcription", c), _rps)),
            _spread(_ratios(groups, (OURS, "transcription", c), (CEILING, "transcription", c), _p50)),
            _spread(_ratios(groups, (OURS, "chat_local_path", c), (PEER, "chat_local_path", c), _rps)),
        ]
        print(f"| {c} | " + " | ".join(cells) + " |")
    static = sorted({(w, c) for (label, w, c) in groups if label == STATIC}, key=lambda k: (k[1], k[0]))
    if static:
        print("\nContinuous against static batching, within each round: (a)/(e).\n")
        head = "| workload | concurrency | req/s (a)/(e) | p50 latency (a)/(e) | p99 latency (a)/(e) "
        print(head + "| decode steps (a)/(e) | rows per step (a), (e) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for workload, c in static:
            a, e = (OURS, workload, c), (STATIC, workload, c)
            cells = [_spread(_ratios(groups, a, e, value)) for value in (_rps, _p50, _p99, _steps)]
            occupancy = [statistics.median(r.rows_per_step or 0.0 for r in groups[k]) for k in (a, e)]
            cells.append(f"{occupancy[0]:.1f}, {occupancy[1]:.1f}")
            print(f"| {workload} | {c} | " + " | ".join(cells) + " |")
    _against(groups, "chat", "Chat workloads against greedy `chat`, within each round: req/s ratio.", OURS)
    _against(
        groups,
        BASELINE,
        "This tree (a) against --baseline-src/--baseline-flags (f), within each round: req/s ratio.",
        None,
    )
    for run in rows:
        if run.workload == "probe":
            print(f"\npeer probe: {run.label}")


def _against(groups: dict[tuple[str, str, int], list[Run]], bottom: str, title: str, label: str | None) -> None:
    """Ratios to greedy chat (bottom a workload, within `label`), or to the baseline (bottom a config)."""
    pairs = []
    for top_label, workload, c in groups:
        if label is not None and top_label == label and workload != bottom and (label, bottom, c) in groups:
            pairs.append(((top_label, workload, c), (label, bottom, c)))
        if label is None and top_label == OURS and (bottom, workload, c) in groups:
            pairs.append(((top_label, workload, c), (bottom, workload, c)))
    if not pairs:
        return
    print(f"\n{title}\n")
    print("| config | workload | concurrency | req/s ratio | p50 latency ratio | mean completion tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for top, below in pairs:
        tokens = statistics.median(
            r.generated / r.answers_with_usage if r.generated else float("nan") for r in groups[top]
        )
        ratios = [_spread(_ratios(groups, top, below, value)) for value in (_rps, _p50)]
        print(f"| {top[0]} | {top[1]} | {top[2]} | " + " | ".join(ratios) + f" | {tokens:.1f} |")


def _rps(run: Run) -> float:
    return run.rps


def _p50(run: Run) -> float:
    return pct(run.latencies, 0.5)


def _p99(run: Run) -> float:
    return pct(run.latencies, 0.99)


def _steps(run: Run) -> float:
    return float(run.steps or 0)


def _ratios(
    groups: dict[tuple[str, str, int], list[Run]],
    top: tuple[str, str, int],
    bottom: tuple[str, str, int],
    value: Callable[[Run], float],
) -> list[float]:
    below = {r.round: r for r in groups.get(bottom, [])}
    return [value(r) / value(below[r.round]) for r in groups.get(top, []) if r.round in below]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--rounds", type=int, default=3, help="turns each configuration takes per concurrency")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=3200,
        help="our server's prefill budget: 3200 (8 jfk.wav rows a prefill) measured best on 2 CPU cores; "
        "larger prefills run the audio encoder out of cache there. On a GPU pass the server default, 32768.",
    )
    parser.add_argument("--audio", type=Path, default=JFK, help="the WAV every request sends")
    parser.add_argument(
        "--workloads", default="transcription,mix", help="of (a), (b), (e): transcription, mix, chat, chat_varied"
    )
    parser.add_argument("--static", action="store_true", help="also (e): --no-continuous-batching")
    parser.add_argument("--skip-ceiling", action="store_true", help="leave (c) out")
    parser.add_argument("--skip-single", action="store_true", help="leave (b) out")
    parser.add_argument("--baseline-src", type=Path, default=None, help="also (f): our server from this tree")
    parser.add_argument(
        "--baseline-flags",
        default=None,
        help="also (f), or (f) from --baseline-src, with these server flags, e.g. '--omp-wait-policy active'",
    )
    parser.add_argument(
        "--full-vocab", action="store_true", help="the tiny model with the real 131,072-token vocabulary"
    )
    parser.add_argument(
        "--tiny-layers", type=int, default=2, help="decoder layers of the tiny model (30: Mini's depth, tiny widths)"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="a checkpoint instead of the tiny model")
    parser.add_argument("--device", default="cpu", help="where (c) runs; cuda loads it in bfloat16")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-only", action="store_true", help="only (d) and (a) on its chat workload")
    parser.add_argument("--out", type=Path, default=None, help="write every run as JSON here")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.workloads = args.workloads.split(",")
    work = Path(tempfile.mkdtemp(prefix="voxtral-bench-"))
    sys.path.insert(0, str(ROOT))
    from app.model.tiny import build_tiny_model

    model_dir = args.model_dir or build_tiny_model(
        work / "tiny", full_vocab=args.full_vocab, text_layers=args.tiny_layers
    )
    bodies = Bodies(args.tokens, str(model_dir), args.audio)
    args.seconds = bodies.seconds
    rows = [] if args.peer_only else ours_and_ceiling(model_dir, bodies, args, work)
    if not args.skip_peer:
        rows += peer(model_dir, bodies, args, work)
    summarise(rows, args.levels)
    if args.out:
        args.out.write_text(json.dumps([r.row() for r in rows], indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
