"""`python bench/realtime.py --realtime-model`: sessions on a Voxtral Realtime model (tiny-realtime), deltas
while audio arrives (what it measures: bench/realtime.py's docstring). Kept apart from the Silero-turn load
it shares the server start-up and the publishing with."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import procs  # bench/procs.py
import realtime as rt  # bench/realtime.py: the server's start-up and the publishing
import soundfile as sf
import soxr
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.audio_formats import InputDecoder  # noqa: E402
from app.config import Settings  # noqa: E402
from app.model.compute.loader import load_model  # noqa: E402
from app.model.realtime.engine import RealtimeEngine  # noqa: E402
from app.model.realtime.timing import delay_tokens  # noqa: E402

CHUNK_S = 0.1
CHUNK_BYTES = int(24000 * CHUNK_S) * 2
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


@dataclass(frozen=True)
class Token:
    """A reference token with text: where its text ends in the item's, and the chunk (index in the utterance)
    that carried the last audio its input window reads (`ready`) and the end of the audio it speaks for
    (`speech`, `delay` frames earlier); None: only the commit's flush brings it."""

    end: int
    ready: int | None
    speech: int | None


@dataclass(frozen=True)
class Reference:
    """The model layer's own text of one utterance (a `RealtimeEngine` alone, fed the chunks the server
    decodes), and its tokens."""

    text: str
    tokens: list[Token]


@dataclass
class Item:
    deltas: list[tuple[str, float]] = field(default_factory=list)
    completed: str | None = None
    committed_at: float | None = None
    completed_at: float | None = None
    late_deltas: int = 0
    """Deltas after the item's `.completed`: out of order."""


@dataclass
class Outcome:
    items: dict[str, Item] = field(default_factory=dict)
    committed: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    sent: list[list[float]] = field(default_factory=list)
    """Per utterance, the time each chunk was sent."""
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def utterance_chunks(pause_s: float) -> list[bytes]:
    """The sentence and its pause as 24 kHz 16-bit PCM in 100 ms chunks (whole chunks: every utterance
    reaches the server's decoder as the same chunks, so decodes to the same samples)."""
    sentence = sf.read(ROOT / "tests" / "data" / "speech_fr.wav", dtype="float32")[0]
    audio = soxr.resample(np.concatenate([sentence, np.zeros(int(pause_s * 16000), np.float32)]), 16000, 24000)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    pcm += b"\0" * (-len(pcm) % CHUNK_BYTES)
    return [pcm[at : at + CHUNK_BYTES] for at in range(0, len(pcm), CHUNK_BYTES)]


def reference(chunks: list[bytes], delay_ms: int) -> Reference:
    """Decode the chunks as the session does (`InputDecoder`, its flush at the commit), run the model layer
    alone over them, and place each token's audio in the chunks."""
    loaded = load_model(Settings(model="tiny-realtime"))
    decoder = InputDecoder("audio/pcm")
    pieces = [decoder.push(chunk) for chunk in chunks]
    delivered = np.cumsum([piece.shape[0] for piece in pieces])  # 16 kHz samples after each chunk
    engine = RealtimeEngine(loaded.model, loaded.processor, max_streams=1)
    stream = engine.open(delay_ms)
    engine.feed(stream, np.concatenate([*pieces, decoder.flush()]))
    engine.flush(stream)
    steps: list[Any] = []
    while not (steps and steps[-1].final):
        steps += engine.tick().steps
    geometry, delay = engine.geometry, delay_tokens(delay_ms)

    def chunk_of(samples: int) -> int | None:
        index = int(np.searchsorted(delivered, samples))
        return index if index < len(chunks) else None

    text, tokens = "", []
    for step in steps:
        if step.text:
            text += step.text
            ready = geometry.first_samples(delay) + (step.frame - delay) * geometry.samples_per_token
            speech = (step.frame + 1 - delay) * geometry.samples_per_token
            tokens.append(Token(len(text), chunk_of(ready), chunk_of(speech)))
    return Reference(text, tokens)


async def session(url: str, chunks: list[bytes], utterances: int, delay_ms: int, start_s: float) -> Outcome:
    """Manual commits: `utterances` times the chunks at real time, a commit after each; every event kept."""
    await asyncio.sleep(start_s)
    outcome = Outcome()
    async with connect(url, max_size=None) as ws:
        audio_input = {"turn_detection": None, "transcription": {"delay_ms": delay_ms}}
        update = {"type": "transcription", "audio": {"input": audio_input}}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        sender = asyncio.create_task(send_paced(ws, chunks, utterances, outcome))
        while len(outcome.completed) + outcome.failed < utterances and not outcome.errors:
            record(json.loads(await asyncio.wait_for(ws.recv(), timeout=120)), outcome, time.monotonic())
        await sender
    return outcome


async def send_paced(ws: Any, chunks: list[bytes], utterances: int, outcome: Outcome) -> None:
    start = time.monotonic()
    for utterance in range(utterances):
        outcome.sent.append([])
        for index, chunk in enumerate(chunks):
            await asyncio.sleep(max(0.0, start + (utterance * len(chunks) + index) * CHUNK_S - time.monotonic()))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}))
            outcome.sent[-1].append(time.monotonic())
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))


def record(event: dict[str, Any], outcome: Outcome, now: float) -> None:
    kind = event["type"]
    if kind == DELTA:
        item = outcome.items.setdefault(event["item_id"], Item())
        item.late_deltas += item.completed is not None
        item.deltas.append((event["delta"], now))
    elif kind == "input_audio_buffer.committed":
        outcome.committed.append(event["item_id"])
        outcome.items.setdefault(event["item_id"], Item()).committed_at = now
    elif kind == COMPLETED:
        item = outcome.items.setdefault(event["item_id"], Item())
        item.completed, item.completed_at = event["transcript"], now
        outcome.completed.append(event["item_id"])
    elif kind == "conversation.item.input_audio_transcription.failed":
        outcome.failed += 1
    elif kind == "error":
        outcome.errors.append(json.dumps(event["error"]))


def latencies(outcome: Outcome, ref: Reference) -> tuple[list[float], list[float]]:
    """(speech -> delta, window ready -> delta) seconds of every delta whose text matches the reference's
    (the n-th delta of an item is its n-th token with text) and whose audio came before the commit."""
    speech, ready = [], []
    for utterance, item_id in enumerate(outcome.committed):
        item, sent = outcome.items[item_id], outcome.sent[utterance]
        for (text, at), token, end in zip(item.deltas, ref.tokens, _ends(item.deltas), strict=False):
            if end != token.end or not ref.text[:end].endswith(text):
                break  # past here this item is not the reference's
            if token.ready is None or token.speech is None:
                continue  # the commit's flush brings it: commit -> .completed says its time
            speech.append(at - sent[token.speech])
            ready.append(at - sent[token.ready])
    return speech, ready


def _ends(deltas: list[tuple[str, float]]) -> list[int]:
    return list(np.cumsum([len(text) for text, _ in deltas]).astype(int))


def tick_metrics(base_url: str) -> dict[str, float]:
    """The server's realtime tick histograms: count, sums, and ticks within the 80 ms budget."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    return {
        "ticks": values["voxtral_realtime_tick_seconds_count"],
        "seconds": values["voxtral_realtime_tick_seconds_sum"],
        "rows": values["voxtral_realtime_tick_rows_sum"],
        "within": values['voxtral_realtime_tick_real_time_factor_bucket{le="1.0"}'],
        "over_2x": values["voxtral_realtime_tick_real_time_factor_count"]
        - values['voxtral_realtime_tick_real_time_factor_bucket{le="2.0"}'],
    }


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(q * len(ordered)) - 1)] if ordered else float("nan")


def report(outcomes: list[Outcome], ref: Reference, ticks: dict[str, float], args: argparse.Namespace) -> str:
    items = [o.items[i] for o in outcomes for i in o.committed if i in o.items]
    completed = [i for i in items if i.completed is not None]
    lost = sum(i.completed != "".join(t for t, _ in i.deltas) for i in completed)
    late = sum(i.late_deltas for i in items)
    in_order = all(o.completed == o.committed[: len(o.completed)] for o in outcomes)
    same = sum(i.completed == ref.text for i in completed)
    speech, ready = ([x for o in outcomes for x in latencies(o, ref)[k]] for k in (0, 1))
    commit = [i.completed_at - i.committed_at for i in completed if i.completed_at and i.committed_at]
    n, rows = max(ticks["ticks"], 1), ticks["rows"]
    expected = args.sessions * args.utterances
    lines = [
        f"- items: expected {expected}, committed {len(items)}, completed {len(completed)}, "
        f"failed {sum(o.failed for o in outcomes)}, error events {sum(len(o.errors) for o in outcomes)}; "
        f"completed in commit order in every session: {in_order}",
        f"- deltas {sum(len(i.deltas) for i in items)}: items whose `.completed` != their deltas joined: {lost}; "
        f"deltas after their item's `.completed`: {late}; items equal to the model layer alone: "
        f"{same}/{len(completed)} ({len(ref.tokens)} tokens with text an item)",
        f"- speech -> delta (configured delay {args.delay_ms} ms): p50 {1000 * _p(speech, 0.5):.0f} ms, "
        f"p95 {1000 * _p(speech, 0.95):.0f} ms, max {1000 * max(speech, default=float('nan')):.0f} ms "
        f"(n={len(speech)}); the server's part (window complete -> delta): p50 {1000 * _p(ready, 0.5):.0f} ms, "
        f"p95 {1000 * _p(ready, 0.95):.0f} ms",
        f"- commit -> .completed (the flush's {delay_tokens(args.delay_ms) + 11} padding frames): "
        f"p50 {_p(commit, 0.5):.3f} s, p95 {_p(commit, 0.95):.3f} s",
        f"- ticks {ticks['ticks']:.0f}: mean {1000 * ticks['seconds'] / n:.1f} ms, mean rows {rows / n:.1f}, "
        f"within the 80 ms budget {ticks['within'] / n:.0%}, over 2x it {ticks['over_2x'] / n:.0%}",
    ]
    return "\n".join(lines)


async def run_all(url: str, chunks: list[bytes], args: argparse.Namespace) -> list[Outcome]:
    rng = random.Random(0)
    spread = len(chunks) * CHUNK_S if args.spread_s is None else args.spread_s
    starts = [rng.uniform(0.0, spread) for _ in range(args.sessions)]
    return list(await asyncio.gather(*(session(url, chunks, args.utterances, args.delay_ms, s) for s in starts)))


def main(args: argparse.Namespace) -> None:
    """The run (`python bench/realtime.py --realtime-model`), with bench/realtime.py's server start-up and
    publishing."""
    chunks = utterance_chunks(args.pause_s)
    ref = reference(chunks, args.delay_ms)  # before the server starts: it then finds tiny-realtime built
    intervals = args.tick_intervals_ms or [None]
    texts = []
    for interval in intervals:  # configurations take turns: one server each, the same load
        args.tick_interval_ms = interval
        text = one_run(args, chunks, ref)
        texts.append(text if interval is None else f"- **--realtime-tick-interval-ms {interval:g}**\n{text}")
    rt.publish("realtime.py", "\n".join(texts), args.out)


def one_run(args: argparse.Namespace, chunks: list[bytes], ref: Reference) -> str:
    """One server under the load: the report's lines."""
    port = procs.free_port()
    base = f"http://127.0.0.1:{port}"
    with rt.serving(lambda log: rt.start_server(port, args, log)):
        before = tick_metrics(base)
        outcomes = asyncio.run(run_all(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription", chunks, args))
        after = tick_metrics(base)
    ticks = {key: after[key] - before[key] for key in after}
    return report(outcomes, ref, ticks, args)
