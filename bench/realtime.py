"""Realtime load: many transcription sessions at once, each streaming speech in real time.

Starts `python -m app.main serve --model tiny ...` as a subprocess, opens `--sessions` WebSocket sessions
(server VAD, 24 kHz PCM), and has each stream `--utterances` sentences (tests/data/speech_fr.wav, 2.9 s)
with `--pause-s` of silence after each, in 100 ms chunks paced at real time; session starts are spread
(seeded) over one sentence and its pause, as independent speakers are (`--spread-s 1`: nearly in step, the
worst case: every session's utterance ends within the same second). It checks that every utterance is
committed once and answered (`.completed`, none `.failed`, none lost), reads the server's batch-size
histogram before and after, and reports p50/p95 of the time from `speech_stopped` to `.completed`
as the client sees them.

    python bench/realtime.py                           # 32 sessions x 3 utterances
    python bench/realtime.py --sessions 8 --out ''     # a quick look, nothing written

The tiny model's random weights never stop on their own: a transcription decodes its whole budget, set
here to 4 + 5 tokens per second of audio (`--tokens-per-s`), about what real speech transcribes to.
Appends the figures and the exact command to bench/RESULTS.md (--out).

`--realtime-model`: the same load on `--model tiny-realtime` (Voxtral Realtime: text while audio arrives).
Each session (manual commits, `turn_detection: null`, `delay_ms` from `--delay-ms`) streams `--utterances`
times the sentence and its pause, in 100 ms chunks paced at real time, and commits after each. Checks: every
item's `.delta` events arrive in order before its `.completed`, nothing is lost (`.completed` text == its
deltas joined), and each item's text equals the model layer's own (a `RealtimeEngine` fed the same chunks
alone, computed here first; it tells each delta's token-frame). Latency per delta, p50 and p95: from the
chunk that carried the end of the audio its token speaks for (`delay` frames before the frame that emitted
it) to its arrival, against `--delay-ms` (the model's delay plus the server's); and from the chunk that
completed the token's input window to its arrival (the server's part alone). Tokens of the commit's
right-padding flush are left out of both (they wait for the commit): commit -> `.completed` says their
time. Tick time and rows a tick from the server's `voxtral_realtime_tick_*` histograms.

    python bench/realtime.py --realtime-model                  # 32 sessions x 3 utterances on tiny-realtime
    python bench/realtime.py --realtime-model --tick-intervals-ms 0,40,0,40   # tick coalescing, taking turns
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import soxr
from procs import free_port, wait_ready  # bench/procs.py
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
CHUNK_S = 0.1


@dataclass
class Outcome:
    committed: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def stream_audio(utterances: int, pause_s: float) -> bytes:
    """The sentence and a pause, `utterances` times, as 24 kHz 16-bit PCM."""
    sentence = sf.read(ROOT / "tests" / "data" / "speech_fr.wav", dtype="float32")[0]
    one = np.concatenate([sentence, np.zeros(int(pause_s * 16000), np.float32)])
    audio = soxr.resample(np.tile(one, utterances), 16000, 24000)
    return bytes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


async def session(url: str, audio: bytes, delay_s: float, expected: int) -> Outcome:
    await asyncio.sleep(delay_s)
    outcome, stopped_at = Outcome(), {}
    async with connect(url, max_size=None) as ws:
        vad = {"type": "server_vad", "silence_duration_ms": 500}
        update = {"type": "transcription", "audio": {"input": {"turn_detection": vad}}}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        sender = asyncio.create_task(send_paced(ws, audio))
        while len(outcome.completed) + outcome.failed < expected:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=120))
            record(event, outcome, stopped_at)
        await sender
    return outcome


async def send_paced(ws: object, audio: bytes) -> None:
    step = int(24000 * CHUNK_S) * 2
    start = time.monotonic()
    for index, at in enumerate(range(0, len(audio), step)):
        await asyncio.sleep(max(0.0, start + index * CHUNK_S - time.monotonic()))
        chunk = base64.b64encode(audio[at : at + step]).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))  # type: ignore[attr-defined]


def record(event: dict[str, object], outcome: Outcome, stopped_at: dict[object, float]) -> None:
    kind, now = event["type"], time.monotonic()
    if kind == "input_audio_buffer.speech_stopped":
        stopped_at[event["item_id"]] = now
    elif kind == "input_audio_buffer.committed":
        outcome.committed.append(str(event["item_id"]))
    elif kind == "conversation.item.input_audio_transcription.completed":
        outcome.completed.append(str(event["item_id"]))
        outcome.latencies.append(now - stopped_at[event["item_id"]])
    elif kind == "conversation.item.input_audio_transcription.failed":
        outcome.failed += 1
    elif kind == "error":
        outcome.errors.append(json.dumps(event["error"]))


def batch_histogram(base_url: str) -> tuple[float, float, float]:
    """(decode steps, rows summed over them, steps with one row) from voxtral_batch_size."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    return (
        values["voxtral_batch_size_count"],
        values["voxtral_batch_size_sum"],
        values['voxtral_batch_size_bucket{le="1.0"}'],
    )


def start_server(port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "app.main", "serve", "--model", "tiny", "--port", str(port),
        "--max-batch-size", str(args.max_batch_size), "--realtime-max-sessions", str(args.sessions),
        "--transcription-tokens-per-audio-s", str(args.tokens_per_s), "--transcription-min-tokens", "4",
        "--log-level", "warning",
    ]  # fmt: skip
    if getattr(args, "realtime_model", False):  # a stream flushing while the next utterance's opens: 2 each
        cmd[cmd.index("tiny")] = "tiny-realtime"
        cmd += ["--realtime-max-streams", str(2 * args.sessions)]
        if getattr(args, "tick_interval_ms", None) is not None:
            cmd += ["--realtime-tick-interval-ms", str(args.tick_interval_ms)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXTRAL_")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_ready(proc, f"http://127.0.0.1:{port}", log)
    return proc


@contextmanager
def serving(start: Callable[[Path], subprocess.Popen[bytes]]) -> Iterator[subprocess.Popen[bytes]]:
    """The server `start(log)` starts, logging into a temporary folder, for the `with` body; the log's tail is
    printed when the body fails, and the server is terminated either way."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = start(log)
        try:
            yield proc
        except BaseException:
            print(log.read_text()[-5000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(60)


def figures(outcomes: list[Outcome]) -> str:
    """`p50 | p95 | max | completed | failed` of the sessions' end-of-speech to `.completed` latencies."""
    latencies = sorted(x for o in outcomes for x in o.latencies)
    p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)]
    failed = sum(o.failed for o in outcomes) + sum(len(o.errors) for o in outcomes)
    done = sum(len(o.completed) for o in outcomes)
    return f"{statistics.median(latencies):.3f} | {p95:.3f} | {latencies[-1]:.3f} | {done} | {failed}"


def publish(script: str, text: str, out: str | None) -> None:
    """Print a run's figures under a header with the time, the exact command and the load, and append them
    to `out` (bench/RESULTS.md by default)."""
    command = f"python bench/{script} " + shlex.join(sys.argv[1:])
    load = os.getloadavg()[0]
    header = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `{command.strip()}`, load average at the end {load:.2f}"
    print(header + "\n\n" + text)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(f"\n{header}\n\n{text}\n")


async def run_all(url: str, args: argparse.Namespace) -> list[Outcome]:
    audio = stream_audio(args.utterances, args.pause_s)
    rng = random.Random(0)
    cycle = len(audio) / 2 / 24000 / args.utterances  # one sentence and its pause
    spread = cycle if args.spread_s is None else args.spread_s
    delays = [rng.uniform(0.0, spread) for _ in range(args.sessions)]
    return list(await asyncio.gather(*(session(url, audio, d, args.utterances) for d in delays)))


def report(outcomes: list[Outcome], batches: tuple[float, float, float], args: argparse.Namespace) -> str:
    latencies = sorted(x for o in outcomes for x in o.latencies)
    expected = args.sessions * args.utterances
    committed = sum(len(o.committed) for o in outcomes)
    completed = sum(len(o.completed) for o in outcomes)
    in_order = all(o.completed == o.committed[: len(o.completed)] for o in outcomes)
    steps, rows, single = batches
    p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)] if latencies else float("nan")
    lines = [
        f"- utterances: expected {expected}, committed {committed}, completed {completed}, "
        f"failed {sum(o.failed for o in outcomes)}, error events {sum(len(o.errors) for o in outcomes)}; "
        f"completed in commit order in every session: {in_order}",
        f"- decode steps {steps:.0f}: mean rows per step {rows / max(steps, 1):.1f}, "
        f"steps with one row {single / max(steps, 1):.0%}",
        f"- speech_stopped -> .completed: p50 {statistics.median(latencies):.3f} s, p95 {p95:.3f} s, "
        f"max {latencies[-1]:.3f} s (n={len(latencies)})",
    ]
    return "\n".join(lines)


def session_args(parser: argparse.ArgumentParser, sessions: int) -> None:
    """The well-behaved sessions' options, shared by this benchmark and those that run beside them."""
    parser.add_argument("--sessions", type=int, default=sessions)
    parser.add_argument("--utterances", type=int, default=3)
    parser.add_argument("--pause-s", type=float, default=1.5)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--tokens-per-s", type=float, default=5.0)
    parser.add_argument(
        "--spread-s", type=float, default=None, help="session starts spread over this (default: one sentence+pause)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    session_args(parser, sessions=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--realtime-model", action="store_true", help="tiny-realtime: deltas while audio arrives")
    parser.add_argument("--delay-ms", type=int, default=480, help="--realtime-model: the sessions' delay_ms")
    parser.add_argument(
        "--tick-intervals-ms",
        type=lambda s: [float(v) for v in s.split(",")],
        default=None,
        help="--realtime-model: one run per value of --realtime-tick-interval-ms, in turn (e.g. 0,40,0,40)",
    )
    args = parser.parse_args()
    if args.realtime_model:
        import realtime_streaming  # bench/realtime_streaming.py

        realtime_streaming.main(args)
        return
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(lambda log: start_server(port, args, log)):
        before = batch_histogram(base)
        outcomes = asyncio.run(run_all(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription", args))
        after = batch_histogram(base)
    text = report(outcomes, tuple(a - b for a, b in zip(after, before, strict=True)), args)  # type: ignore[arg-type]
    publish("realtime.py", text, args.out)


if __name__ == "__main__":
    main()
