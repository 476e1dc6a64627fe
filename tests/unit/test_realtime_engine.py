"""The realtime engine's tokens are transformers' own streaming `generate` tokens, for each stream alone, for
streams joining and leaving a shared batch with different delays, and over a 10-minute stream whose caches
stay the same size (tiny-realtime, CPU, float32)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.model.realtime.engine import RealtimeEngine, StreamStep
from app.model.realtime.timing import DELAY_MS, FrameGeometry, delay_tokens
from app.model.tiny import REALTIME_DECODER_WINDOW, REALTIME_ENCODER_WINDOW, build_tiny_realtime_model
from tests.support.realtime_reference import reference_tokens, right_padded, synthetic, windows


@pytest.fixture(scope="module")
def realtime(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoProcessor, VoxtralRealtimeForConditionalGeneration

    path = build_tiny_realtime_model(Path(tmp_path_factory.mktemp("tiny-realtime")))
    model = VoxtralRealtimeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny shapes: threads only contend (the machine is shared); the same count for engine and reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stream_alone(engine: RealtimeEngine, audio: np.ndarray, delay: int | str | None, chunk: int) -> list[int]:
    sid = engine.open(delay)
    tokens: list[int] = []
    for start in range(0, len(audio), chunk):
        engine.feed(sid, audio[start : start + chunk])
        while engine.ready():
            tokens += [step.token for step in engine.tick().steps]
    engine.flush(sid)
    steps: list[StreamStep] = []
    while engine.ready():
        steps += engine.tick().steps
    assert steps[-1].final and not any(s.final for s in steps[:-1])
    engine.close(sid)
    return tokens + [s.token for s in steps]


def test_delay_names_and_milliseconds_map_to_mistral_commons_delay_tokens(realtime: tuple[Any, Any]) -> None:
    audio_config = realtime[1].mistral_common_audio_config
    for ms in range(80, 2401, 80):
        assert delay_tokens(ms) == audio_config.get_num_delay_tokens(ms)
    assert {name: delay_tokens(name) for name in DELAY_MS} == {
        "minimal": 1,
        "low": 3,
        "medium": 6,
        "high": 12,
        "xhigh": 30,
    }
    assert delay_tokens(None) == audio_config.get_num_delay_tokens() == 6
    for bad in (0, 40, 2480, 100, "fast", True):
        with pytest.raises(ValueError):
            delay_tokens(bad)


def test_tokens_ready_counts_what_transformers_recipe_can_compute(realtime: tuple[Any, Any]) -> None:
    """For every received length, the frames ready are the prompt plus the windows the reference loop yields
    over that much audio (its `<` skips a window ending exactly at the last sample, which a live stream has
    received: one more there; flushed audio is whole frames, where the two agree); a flush pads to exactly the
    reference's right pad."""
    processor = realtime[1]
    geometry = FrameGeometry.of(processor)
    assert geometry == FrameGeometry()
    for delay in (1, 6, 30):
        for samples in range(geometry.first_samples(delay), 20 * 1280, 97):
            audio = np.zeros(samples, dtype=np.float32)
            at_edge = (samples - 200) % 1280 == 0
            reference = 1 + sum(1 for _ in windows(processor, audio, delay))
            assert geometry.tokens_ready(samples, delay) == reference + at_edge
        assert geometry.tokens_ready(geometry.first_samples(delay) - 1, delay) == 0
        for samples in (0, 1, 1279, 1280, 5000):
            padded = samples + geometry.flush_samples(samples, delay)
            assert padded == len(right_padded(np.zeros(samples), delay))


@pytest.mark.parametrize("delay", ["minimal", None, 960])
def test_one_stream_equals_generate(realtime: tuple[Any, Any], delay: str | int | None) -> None:
    model, processor = realtime
    audio = synthetic(4.3, seed=1)
    engine = RealtimeEngine(model, processor, max_streams=4)
    got = stream_alone(engine, audio, delay, chunk=1600)
    want = reference_tokens(model, processor, audio, delay_tokens(delay))
    assert len(set(want)) > 5, "the tiny model must not be deaf to its input"
    assert got == want


def test_streams_joining_and_leaving_get_the_tokens_they_get_alone(realtime: tuple[Any, Any]) -> None:
    """Five streams with different delays, lengths and chunk sizes start at different ticks; one is closed
    half-way, one flushes while others still speak: each gets its alone tokens (the closed one a prefix), and
    streams with different delays share the step forward."""
    model, processor = realtime
    plan = [  # (delay, seconds, chunk samples, first tick fed)
        (6, 3.0, 1600, 0),
        (1, 5.0, 800, 3),
        (12, 2.2, 4000, 3),
        (6, 4.1, 1280, 10),
        (30, 4.0, 1600, 20),
    ]
    audios = [synthetic(seconds, seed=10 + i) for i, (_, seconds, _, _) in enumerate(plan)]
    engine = RealtimeEngine(model, processor, max_streams=8)
    ids: dict[int, int] = {}
    got: dict[int, list[int]] = {i: [] for i in range(len(plan))}
    fed = [0] * len(plan)
    closed_at = {3: 25}
    mixed_delays = False
    for tick in range(400):
        for i, (delay, _, chunk, start) in enumerate(plan):
            if tick == start:
                ids[i] = engine.open(delay * 80)
            if i in ids and tick >= start and fed[i] < len(audios[i]):
                engine.feed(ids[i], audios[i][fed[i] : fed[i] + chunk])
                fed[i] += chunk
                if fed[i] >= len(audios[i]):
                    engine.flush(ids[i])
            if closed_at.get(i) == tick:
                engine.close(ids.pop(i))
        result = engine.tick()
        by_stream = {sid: i for i, sid in ids.items()}
        stepping = [by_stream[s.stream] for s in result.steps if got[by_stream[s.stream]]]
        mixed_delays |= len({plan[i][0] for i in stepping}) > 1
        for step in result.steps:
            got[by_stream[step.stream]].append(step.token)
        assert result.padded_rows >= result.rows
        if tick > 30 and not engine.ready():
            break
    assert mixed_delays
    for i, (delay, _, _, _) in enumerate(plan):
        want = reference_tokens(model, processor, audios[i], delay)
        if i in closed_at:
            assert 0 < len(got[i]) < len(want)
            assert got[i] == want[: len(got[i])]
        else:
            assert got[i] == want, f"stream {i}"


def test_streams_around_a_silent_one_read_their_caches_as_one_range(realtime: tuple[Any, Any]) -> None:
    """Three streams in slots 0, 1 and 2; the middle one gets no audio for 20 ticks while the others speak: their
    forward reads slots 0..2 as one range (the silent stream's slot a row that only fills the step, writing to
    the scratch slot), not gathering their rings, and every stream's tokens are its alone tokens."""
    model, processor = realtime
    audios = [synthetic(3.0, seed=40 + i) for i in range(3)]
    engine = RealtimeEngine(model, processor, max_streams=4)
    ids = [engine.open(480) for _ in range(3)]
    got: list[list[int]] = [[], [], []]
    fed, chunk, around = [0, 0, 0], 1280, 0
    for tick in range(400):
        for i, sid in enumerate(ids):
            if (i == 1 and 10 <= tick < 30) or fed[i] >= len(audios[i]):
                continue
            engine.feed(sid, audios[i][fed[i] : fed[i] + chunk])
            fed[i] += chunk
            if fed[i] >= len(audios[i]):
                engine.flush(sid)
        result = engine.tick()
        if {step.stream for step in result.steps} == {ids[0], ids[2]} and tick > 10:
            around += 1
            assert not result.gathered and result.padded_rows >= 3, result
        for step in result.steps:
            got[ids.index(step.stream)].append(step.token)
        if all(f >= len(a) for f, a in zip(fed, audios, strict=True)) and not engine.ready():
            break
    assert around >= 10
    for i, audio in enumerate(audios):
        assert got[i] == reference_tokens(model, processor, audio, 6), f"stream {i}"


def test_ten_minute_stream_equals_generate_with_constant_caches(realtime: tuple[Any, Any]) -> None:
    """600 s in 100 ms chunks (7,500 tokens: the tiny encoder window of 24 frames and decoder window of 48
    tokens wrap hundreds of times): the tokens are generate's, the cache bytes never change and the host keeps
    at most one window of audio."""
    model, processor = realtime
    audio = synthetic(600.0, seed=3)
    engine = RealtimeEngine(model, processor, max_streams=2)
    cache_bytes = engine.cache_bytes()
    sid = engine.open(None)
    got: list[int] = []
    held = 0
    for start in range(0, len(audio), 1600):
        engine.feed(sid, audio[start : start + 1600])
        while engine.ready():
            got += [s.token for s in engine.tick().steps]
        if got:  # past the prompt, whose window is longer
            held = max(held, engine.held_samples(sid))
    engine.flush(sid)
    while engine.ready():
        got += [s.token for s in engine.tick().steps]
    assert engine.cache_bytes() == cache_bytes
    assert held <= 1680 + 1600
    assert len(got) > 100 * (REALTIME_DECODER_WINDOW + REALTIME_ENCODER_WINDOW)
    assert got == reference_tokens(model, processor, audio, 6)


def test_tiny_realtime_is_served_and_written_by_the_cli(tmp_path: Path) -> None:
    """`--model tiny-realtime` loads the Realtime class (the loader reads model_type voxtral_realtime) with a
    tekken carrying the streaming audio settings; `voxtral-server tiny-model DIR --realtime` writes one."""
    from transformers import VoxtralRealtimeForConditionalGeneration

    from app.config import Settings
    from app.main import cli
    from app.model.compute.loader import load_model, model_class

    loaded = load_model(Settings(model="tiny-realtime", cache_dir=tmp_path / "cache", device="cpu"))
    assert isinstance(loaded.model, VoxtralRealtimeForConditionalGeneration) and loaded.random_weights
    audio = loaded.processor.mistral_common_audio_config
    assert audio.is_streaming and audio.transcription_delay_ms == 480 and audio.n_left_pad_tokens == 32
    assert cli(["tiny-model", str(tmp_path / "written"), "--realtime"]) == 0
    assert model_class(str(tmp_path / "written")) is VoxtralRealtimeForConditionalGeneration
