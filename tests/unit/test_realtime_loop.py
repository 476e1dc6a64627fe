"""`StreamLoop`, the realtime ticking thread between the event loop and the engine, driven as the serving layer
drives it (no HTTP, no socket): streams opened, fed and flushed at different moments through its commands
join the ticks of streams already running and each get the tokens they get alone; a stream closed half-way
ends its `steps()` and the others go on; a stream past `max_streams` is refused 429 before anything is queued.
The engine is the real one over tiny-realtime (CPU, float32); the reference is transformers' own streaming
`generate` (tests/support/realtime_reference.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from app.errors import RateLimited
from app.metrics import Metrics
from app.model.compute.loader import LoadedModel
from app.model.realtime.engine import RealtimeEngine, TickResult
from app.serving.realtime.streams import Stream, StreamLoop
from tests.support.realtime_reference import reference_tokens, synthetic


@pytest.fixture(scope="module")
def realtime(realtime_model: LoadedModel) -> tuple[Any, Any]:
    return realtime_model.model, realtime_model.processor


class _Ticks:
    """The rows of every tick the loop's thread runs (the real `tick`, recorded)."""

    def __init__(self, engine: RealtimeEngine) -> None:
        self.rows: list[int] = []
        self.streams: list[set[int]] = []
        real = engine.tick

        def tick() -> TickResult:
            result = real()
            self.rows.append(result.rows)
            self.streams.append({step.stream for step in result.steps})
            return result

        engine.tick = tick  # type: ignore[method-assign]


async def _speak(stream: Stream, audio: np.ndarray, chunk: int, pause: float) -> None:
    """Feed `audio` in `chunk`s, `pause` seconds apart (a client's pace), then flush."""
    for start in range(0, len(audio), chunk):
        stream.feed(audio[start : start + chunk])
        await asyncio.sleep(pause)
    stream.flush()


async def _collect(stream: Stream) -> list[int]:
    return [step.token async for step in stream.steps()]


def test_streams_joining_at_different_ticks_get_their_alone_tokens(realtime: tuple[Any, Any]) -> None:
    model, processor = realtime
    plan = [(480, 3.0, 1600), (80, 2.5, 800), (960, 2.0, 4000)]  # (delay ms, seconds, chunk samples)
    audios = [synthetic(seconds, seed=40 + i) for i, (_, seconds, _) in enumerate(plan)]
    engine = RealtimeEngine(model, processor, max_streams=4)
    ticks = _Ticks(engine)
    loop = StreamLoop(engine, Metrics(CollectorRegistry()), max_streams=4, tick_interval=0.005)

    async def one(i: int, started: list[asyncio.Event]) -> tuple[int, list[int]]:
        """Stream i opens once stream i - 1 has its first token: it joins a running batch, at a later tick."""
        delay, _, chunk = plan[i]
        if i:
            await started[i - 1].wait()
        stream, tokens = loop.open(delay)
        assert tokens == delay // 80
        speaking = asyncio.create_task(_speak(stream, audios[i], chunk, 0.01))
        got: list[int] = []
        async for step in stream.steps():
            got.append(step.token)
            started[i].set()
        await speaking
        stream.close()
        return tokens, got

    async def main() -> list[tuple[int, list[int]]]:
        started = [asyncio.Event() for _ in plan]
        loop.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i, started) for i in range(len(plan)))), timeout=120)
        finally:
            loop.stop()

    results = asyncio.run(main())
    for i, (tokens, got) in enumerate(results):
        want = reference_tokens(model, processor, audios[i], tokens)
        assert len(set(want)) > 3, "the tiny model must not be deaf to its input"
        assert got == want, f"stream {i}"
    first_tick = [next(t for t, streams in enumerate(ticks.streams) if sid in streams) for sid in range(len(plan))]
    assert len(set(first_tick)) == len(plan), f"the streams joined at ticks {first_tick}: not one each"
    assert max(ticks.rows) >= 2, "no tick stepped two streams together"
    assert loop.live == 0


def test_a_closed_stream_ends_and_the_others_go_on(realtime: tuple[Any, Any]) -> None:
    model, processor = realtime
    audio = synthetic(2.0, seed=50)
    engine = RealtimeEngine(model, processor, max_streams=2)
    loop = StreamLoop(engine, Metrics(CollectorRegistry()), max_streams=2, tick_interval=0.005)

    async def main() -> tuple[list[int], list[int]]:
        loop.start()
        try:
            kept, _ = loop.open(480)
            dropped, _ = loop.open(480)
            with pytest.raises(RateLimited):
                loop.open(480)  # the limit counts open streams, refused before anything is queued
            speaking = [asyncio.create_task(_speak(s, audio, 1600, 0.01)) for s in (kept, dropped)]
            half: list[int] = []
            async for step in dropped.steps():
                half.append(step.token)
                if len(half) == 3:
                    dropped.close()  # its slot is freed; what it had left is dropped
                    break
            got = await asyncio.wait_for(_collect(kept), timeout=120)
            await asyncio.gather(*speaking)
            kept.close()
            return got, half
        finally:
            loop.stop()

    got, half = asyncio.run(main())
    want = reference_tokens(model, processor, audio, 6)
    assert got == want
    assert half == want[:3]
    assert loop.live == 0
