"""Host syncs of the decode path, counted on a simulated CUDA device (tests/support/simdevice.py).

The tiny model runs prefill, sample, step, select and merge as the worker drives them, on tensors that say they
live on `cuda:0`, so every accelerator branch runs; every read of device data on the host and every upload is
logged with its call site. A steady decode step may make the host wait once: the read-back of the sampled ids
(with their log-probs where asked). Uploads must be pinned and non-blocking; how many there are is asserted
exactly per case, so a new one shows. Figures before and after issue 33: docs/PERF.md#model-host-syncs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.config import Settings
from app.engine.choices import fan_out
from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator, BatchState, Row
from app.model.compute.loader import LoadedModel
from app.model.compute.sampling import Sampler
from app.model.runtime import ModelRuntime
from app.model.text.prompts import Prompter
from app.model.values import OutputSpec
from app.types import SamplingParams
from tests.support.audio_fixtures import JFK
from tests.support.simdevice import DEVICE, SimDevice, Transfer, to_device

STEPS = 4
GREEDY = SamplingParams()
DEFAULT = SamplingParams(temperature=0.2, top_p=0.95, seed=1)


@dataclass
class Sim:
    """The tiny model on the simulated device, its generator, a sampler and a prompter."""

    device: SimDevice
    generator: BatchGenerator
    sampler: Sampler
    prompter: Prompter
    runtime: ModelRuntime


@pytest.fixture(scope="module")
def sim(loaded: LoadedModel) -> Iterator[Sim]:
    device = SimDevice()
    model = to_device(copy.deepcopy(loaded.model))
    with device.on():
        log_mel = LogMel(loaded.processor.feature_extractor, 3000, DEVICE)
        # With prefix caching (the default): a hit takes its lowest free holder and a miss a slot below the
        # step's padded size, so the cases' first steps compact nothing (no upload that no steady step has).
        generator = BatchGenerator(model, pad_token_id=11, log_mel=log_mel)
        yield Sim(device, generator, Sampler(), Prompter(loaded.processor, "tiny"), ModelRuntime.of(loaded, Settings()))


@dataclass
class Run:
    """What a run logged: at the prefill (and the merge or fan-out that starts a batch), and at each step."""

    start: list[Transfer]
    steps: list[list[Transfer]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


def _rows(sim: Sim, params: list[SamplingParams], audio: bool = False, spec: OutputSpec | None = None) -> list[Row]:
    rows = []
    for i, p in enumerate(params):
        text = "Tell me " + "more " * (3 * i)  # different lengths: the batch is left-padded
        content: Any = [{"type": "input_audio", "audio": JFK[: 16000 * (1 + i)]}, {"type": "text", "text": text}]
        encoded = sim.prompter.chat([{"role": "user", "content": content if audio else text}])
        factory = sim.runtime.constrainer.factory(spec) if spec is not None else None
        rows.append(Row(encoded.input_ids, encoded.audios, p, constraint=factory() if factory else None))
    return rows


def decode(sim: Sim, rows: list[Row], steps: int = STEPS, leave: int | None = None) -> Run:
    """Prefill `rows`, then `steps` decode steps as the worker runs them (sample, retire, select, prefetch,
    step). `leave`: the row that finishes after the first step. Rows with `n` > 1 are fanned out after the
    prefill, as the engine does."""
    with sim.device.window() as start:
        state, logits = sim.generator.prefill(rows)
        state, logits = _fan_out(sim.generator, state, logits)
    run = Run(start)
    for step in range(steps):
        with sim.device.window() as logged:
            sampled = sim.sampler.step(logits, state.rows)
            tokens = [s.token for s in sampled]  # type: ignore[union-attr]
            for row, token in zip(state.rows, tokens, strict=True):
                row.generated.append(token)
            keep = [i for i in range(len(state.rows)) if not (step == 0 and i == leave)]
            if len(keep) < len(state.rows):
                state = sim.generator.select(state, keep)
            sim.sampler.prefetch(state.rows)
            logits = sim.generator.step(state, [tokens[i] for i in keep])
        run.steps.append(logged)
        run.tokens.append(tokens)
    return run


def _fan_out(gen: BatchGenerator, state: BatchState, logits: torch.Tensor) -> tuple[BatchState, torch.Tensor]:
    """The engine's `n` > 1 (app/engine/choices.py), its work items stood in for by what `row_of` reads."""
    items: dict[int, Any] = {}
    for key, row in enumerate(state.rows):
        row.key = key
        request = SimpleNamespace(
            input_ids=row.input_ids,
            audios=row.audios,
            sampling=row.sampling,
            constraint_factory=None,
            cache_salt=row.cache_salt,
        )
        items[key] = SimpleNamespace(key=key, request=request)
    return fan_out(gen, state, logits, items)


def waits(transfers: list[Transfer]) -> list[str]:
    return [str(t) for t in transfers if t.waits]


def uploads(transfers: list[Transfer]) -> list[str]:
    return [str(t) for t in transfers if not t.waits]


READ_IDS = "read tolist at app/model/compute/sampling.py"
JSON = OutputSpec(json_schema={"type": "object"})
SAMPLED = SamplingParams(temperature=0.7, seed=3)


@dataclass(frozen=True)
class Case:
    params: list[SamplingParams]
    uploads: int
    """Pinned, non-blocking uploads a steady step makes (the ids fed back, the sampling columns, index
    lists): none of them makes the host wait."""
    spec: OutputSpec | None = None
    audio: bool = False


CASES = {
    "greedy": Case([GREEDY] * 3, uploads=1),
    "default sampling": Case([DEFAULT] * 3, uploads=2),
    "mixed greedy and sampled": Case([GREEDY, DEFAULT, GREEDY, SAMPLED], uploads=9),
    "top_k": Case([SamplingParams(temperature=1.0, top_k=5, seed=2)] * 3, uploads=2),
    "min_p": Case([SamplingParams(temperature=1.0, min_p=0.05, seed=2)] * 3, uploads=2),
    "constrained greedy (json_object)": Case([GREEDY] * 3, uploads=2, spec=JSON),
    "constrained sampled (json_object)": Case([DEFAULT] * 3, uploads=3, spec=JSON),
    "log-probs, greedy": Case([SamplingParams(logprobs=3)] * 3, uploads=2),
    "log-probs, sampled": Case([SamplingParams(temperature=0.2, top_p=0.95, seed=1, logprobs=2)] * 3, uploads=3),
    "n = 3": Case([SamplingParams(temperature=0.2, top_p=0.95, seed=1, choices=3)], uploads=2),
    "audio rows": Case([GREEDY] * 2, uploads=1, audio=True),
}


@pytest.fixture(scope="module", autouse=True)
def _byte_table(sim: Sim) -> None:
    """The grammar masks' byte table goes to a device once, at its first constrained step (masks.py)."""
    from app.model.compute.masks import unpack_by_table

    unpack_by_table(torch.zeros((1, 1), dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("name", list(CASES))
def test_a_steady_step_waits_once_for_the_sampled_ids(sim: Sim, name: str) -> None:
    case = CASES[name]
    run = decode(sim, _rows(sim, list(case.params), case.audio, case.spec))
    for logged in run.steps:
        assert len(waits(logged)) == 1 and waits(logged)[0].startswith(READ_IDS), waits(logged)
        assert len(uploads(logged)) == case.uploads, uploads(logged)


def test_penalties_upload_and_never_wait(sim: Sim) -> None:
    """Presence and frequency penalties count the generated ids on the device; from the second step, when
    there are some, three more uploads (the ids, the penalties, the rows)."""
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3)
    run = decode(sim, _rows(sim, [params] * 3))
    assert [len(waits(s)) for s in run.steps] == [1] * STEPS
    assert [len(uploads(s)) for s in run.steps] == [1] + [4] * (STEPS - 1)


def test_a_row_leaving_uploads_its_index_and_never_waits(sim: Sim) -> None:
    """A row leaving frees its slot; the row in the highest slot moves into it (one pinned upload of the
    slot pair, a copy on the device) so the step pads to the size the rows need."""
    run = decode(sim, _rows(sim, [GREEDY] * 3), leave=1)
    assert [len(waits(s)) for s in run.steps] == [1] * STEPS
    assert [len(uploads(s)) for s in run.steps] == [2] + [1] * (STEPS - 1)


def test_a_new_batch_uploads_without_waiting(sim: Sim) -> None:
    """The prefill's ids and positions go up pinned (its causal mask is made on the device; each row's keys and
    values then go into its slot on the device); `n` copies the logits' rows and the prefilled slot into fresh
    ones by uploaded indices. With audio too: the audio tokens are found on the host, where transformers' Voxtral
    read them back (a boolean-mask index in its `get_placeholder_mask`, one read a prefill)."""
    text = decode(sim, _rows(sim, [GREEDY] * 3), steps=0)
    assert waits(text.start) == [] and len(uploads(text.start)) == 3
    fanned = decode(sim, _rows(sim, [SamplingParams(choices=3)]), steps=0)
    assert waits(fanned.start) == [] and len(uploads(fanned.start)) == 4
    audio = decode(sim, _rows(sim, [GREEDY] * 2, audio=True), steps=0)
    assert waits(audio.start) == []


def test_the_simulated_device_gives_the_cpu_tokens(sim: Sim, loaded: LoadedModel) -> None:
    """The accelerator branches compute what the CPU ones do: greedy and seeded rows, padded, alone on the CPU
    and batched on the simulated device, give the same tokens."""
    params = [GREEDY, DEFAULT, SamplingParams(logprobs=2), SamplingParams(temperature=1.0, min_p=0.05, seed=4)]
    on_device = decode(sim, _rows(sim, params), steps=6)
    cpu = BatchGenerator(loaded.model, pad_token_id=11, log_mel=LogMel(loaded.processor.feature_extractor, 3000))
    on_cpu = Sim(sim.device, cpu, Sampler(), sim.prompter, sim.runtime)
    with sim.device.off():
        reference = decode(on_cpu, _rows(on_cpu, params), steps=6)
    assert on_device.tokens == reference.tokens


def test_a_steady_realtime_tick_reads_the_device_once(realtime_model: LoadedModel) -> None:
    """Voxtral Realtime's tick on the simulated device: after the streams' first forwards, a tick makes the
    host wait once, for its tokens (each delay's `t_cond` is looked up on the device, not computed from the
    delays read back); every tick, first forwards included, uploads in two pinned copies a forward (its
    integers, its features) and waits on none."""
    from app.model.realtime.engine import RealtimeEngine
    from tests.support.realtime_reference import synthetic

    device = SimDevice()
    model = to_device(copy.deepcopy(realtime_model.model))
    audio = synthetic(3.0, seed=3)
    with device.on():
        engine = RealtimeEngine(model, realtime_model.processor, max_streams=2)
        streams = [engine.open(480), engine.open(80)]
        for sid in streams:
            engine.feed(sid, audio)
        reads: list[list[Transfer]] = []
        uploads: list[list[Transfer]] = []
        started: set[int] = set()
        while engine.ready() and len(reads) < 6:
            device.transfers.clear()
            result = engine.tick()
            uploads.append([t for t in device.transfers if t.kind == "upload"])
            if {step.stream for step in result.steps} <= started:  # no stream's first forward in this tick
                reads.append([t for t in device.transfers if t.kind == "read"])
            started |= {step.stream for step in result.steps}
    assert len(reads) >= 3, "too few steady ticks"
    assert all(len(r) == 1 for r in reads), [[t.site for t in r] for r in reads]
    assert all(not t.waits for tick in uploads for t in tick), [[str(t) for t in tick] for tick in uploads]
    assert uploads[0] and all(len(tick) in (2, 4) for tick in uploads), [[str(t) for t in tick] for tick in uploads]
