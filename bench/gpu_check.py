"""The server at real scale on one GPU, section by section, each result a JSON line as soon as it exists.

Sections (bench/gpu_check.sh runs them in this order, each under its own time limit):
  env       versions, GPU, free memory
  parity    the tiny model on CUDA: float32 engine == model.generate, alone and in a batch of 8, and
            batched == alone; bfloat16: the percentage of tokens that agree
  split     the tiny model split over cuda:0 and the CPU, as `--device auto` splits a large model over
            GPUs: rows leaving and joining the batch, then whether its step survives CUDA graph capture
  replay    decode step: eager vs replayed. Voxtral Mini's shapes with random bfloat16 weights
            (bench/random_mini.py), 128 cache slots of 1,024 positions: the step's median time at batch 1,
            8, 32 and 128, eager, then replayed after `capture()` (its time and graph memory), each against
            the weight-read floor at a measured copy bandwidth; greedy tokens replayed == eager over 16 steps
            at batch 8; the steady step under `torch.cuda.set_sync_debug_mode` (issue 26, points 3 and 4)
  mini      the same model: the sampler for 32 rows, greedy against the default 0.2 / top_p 0.95;
            prefill time and peak memory for 32 rows of 30 s and for one row of 30 minutes

    python bench/gpu_check.py env parity split --out /tmp/gpu_check.jsonl
    python bench/gpu_check.py replay --budget-s 140 --out /tmp/gpu_check.jsonl
    python bench/gpu_check.py parity split replay mini --device cpu --small     # a smoke test without a GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.model.compute.features import LogMel  # noqa: E402
from app.model.compute.generate import BatchGenerator, BatchState, Row  # noqa: E402
from app.model.compute.loader import load_model  # noqa: E402
from app.model.compute.sampling import Sampler  # noqa: E402
from app.model.compute.slots import CachePlan, padded, width_of  # noqa: E402
from app.model.text.prompts import Encoded, Prompter  # noqa: E402
from app.types import Sampled, SamplingParams  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import random_mini  # noqa: E402

DATASHEET_BYTES_PER_S = (  # (words all in the device's name, memory bandwidth); the first match wins
    (("H200",), 4.8e12),
    (("H100", "PCIe"), 2.0e12),
    (("H100", "NVL"), 3.9e12),
    (("H100",), 3.35e12),  # SXM
    (("A100", "80GB"), 2.0e12),
    (("A100",), 1.555e12),  # 40GB
    (("L40S",), 0.864e12),
)
"""NVIDIA's datasheet figures (peak, not measured): a copy reaches ~80-90 % of them, so a floor taken from
them is a little optimistic. A card not listed is measured (`copy_bandwidth`)."""


def datasheet_bandwidth(name: str) -> float | None:
    """Bytes a second of the card called `name` (torch.cuda.get_device_name), when it is listed."""
    for words, rate in DATASHEET_BYTES_PER_S:
        if all(word.lower() in name.lower() for word in words):
            return rate
    return None


def copy_bandwidth(device: torch.device, size: int = 2**30, repeats: int = 5) -> float:
    """Bytes a second moved by a device-to-device copy (read plus write), the best of `repeats`."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        with timed(device) as t:
            target.copy_(source)
        best = min(best, t.get("event_s", t["wall_s"]))
    return 2 * size / best


class Report:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, section: str, **fields: Any) -> None:
        line = json.dumps({"section": section, **fields}, default=str)
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as out:
                out.write(line + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device) -> Iterator[dict[str, float]]:
    """Wall seconds, and CUDA-event seconds on a GPU, of the block."""
    result: dict[str, float] = {}
    start = end = None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    sync(device)
    began = time.perf_counter()
    yield result
    if start is not None and end is not None:
        end.record()
    sync(device)
    result["wall_s"] = time.perf_counter() - began
    if start is not None and end is not None:
        result["event_s"] = start.elapsed_time(end) / 1000


# -- env ---------------------------------------------------------------------------------------------
def env(args: argparse.Namespace, report: Report) -> None:
    import transformers

    fields: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    fields["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        fields |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
        fields |= {"free_gib": round(free / 2**30, 1), "total_gib": round(total / 2**30, 1)}
        device = torch.device("cuda")
        fields |= {"datasheet_tb_s": (datasheet_bandwidth(torch.cuda.get_device_name()) or 0) / 1e12 or None}
        fields |= {"copy_tb_s": round(copy_bandwidth(device) / 1e12, 2)}
    report("env", **fields)


# -- parity ------------------------------------------------------------------------------------------
def _tiny(args: argparse.Namespace, **overrides: Any) -> Any:
    settings = Settings(model="tiny", cache_dir=args.cache, device=args.device, **overrides)
    return load_model(settings)


def _requests(prompter: Prompter, count: int) -> list[Encoded]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        audio = (rng.standard_normal(16000 * (1 + 3 * (i % 4))) * 0.1).astype(np.float32)
        if i % 3 == 2:
            out.append(prompter.chat([{"role": "user", "content": "Say something " + "more " * i}]))
        else:
            text = {"type": "text", "text": "Describe " + "it " * i}
            out.append(prompter.chat([{"role": "user", "content": [{"type": "input_audio", "audio": audio}, text]}]))
    return out


def _decode(gen: BatchGenerator, rows: list[Row], steps: int, sampler: Sampler) -> list[list[int]]:
    state, logits = gen.prefill(rows)
    for _ in range(steps):
        tokens = [int(t) for t in sampler.sample(logits, state.rows)]  # type: ignore[call-overload]
        for row, token in zip(state.rows, tokens, strict=True):
            row.generated.append(token)
        logits = gen.step(state, torch.tensor(tokens))
    return [r.generated for r in rows]


def _generate(model: Any, log_mel: LogMel, requests: list[Encoded], steps: int) -> list[list[int]]:
    width = max(len(r.input_ids) for r in requests)
    ids = torch.full((len(requests), width), 11)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.input_ids) :] = torch.tensor(r.input_ids)
        mask[i, width - len(r.input_ids) :] = 1
    audios = [a for r in requests for a in r.audios]
    device = next(model.parameters()).device
    features = log_mel.batch(audios).to(device, model.dtype) if audios else None
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        input_features=features,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
    )
    return [row[width:].tolist() for row in out]


def parity(args: argparse.Namespace, report: Report) -> None:
    for dtype in ("float32", "bfloat16"):
        loaded = _tiny(args, dtype=dtype, attn_implementation="eager" if dtype == "float32" else "sdpa")
        prompter = Prompter(loaded.processor, "tiny")
        log_mel = LogMel(loaded.processor.feature_extractor, 3000, loaded.device)
        gen, sampler = BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel), Sampler()
        requests, steps = _requests(prompter, 8), 12
        alone = [_decode(gen, [Row(r.input_ids, r.audios, SamplingParams())], steps, sampler)[0] for r in requests]
        batched = _decode(gen, [Row(r.input_ids, r.audios, SamplingParams()) for r in requests], steps, sampler)
        reference = _generate(loaded.model, log_mel, requests, steps)
        agree = sum(a == b for x, y in zip(batched, reference, strict=True) for a, b in zip(x, y, strict=True))
        report(
            "parity",
            dtype=dtype,
            engine_equals_generate=batched == reference,
            alone_equals_batched=alone == batched,
            token_agreement_pct=round(100 * agree / (len(requests) * steps), 1),
            distinct_outputs=len({tuple(a) for a in alone}),
        )


# -- split -------------------------------------------------------------------------------------------
def split(args: argparse.Namespace, report: Report) -> None:
    """Layer 0 on the GPU, layer 1 and the head on the CPU (on a CPU-only smoke test, all on the CPU)."""
    from transformers import VoxtralForConditionalGeneration

    loaded = _tiny(args, dtype="float32")
    first = 0 if torch.cuda.is_available() else "cpu"
    device_map = {
        "model.audio_tower": first,
        "model.multi_modal_projector": first,
        "model.language_model.embed_tokens": first,
        "model.language_model.rotary_emb": first,
        "model.language_model.layers.0": first,
        "model.language_model.layers.1": "cpu",
        "model.language_model.norm": "cpu",
        "lm_head": "cpu",
    }
    model = VoxtralForConditionalGeneration.from_pretrained(loaded.path, dtype=torch.float32, device_map=device_map)
    prompter = Prompter(loaded.processor, "tiny")
    log_mel = LogMel(loaded.processor.feature_extractor, 3000, next(model.parameters()).device)
    gen, sampler = BatchGenerator(model, pad_token_id=11, log_mel=log_mel), Sampler()
    rows = [Row(r.input_ids, r.audios, SamplingParams()) for r in _requests(prompter, 3)]
    state, logits = gen.prefill(rows)
    layers = [str(k.device) for k in gen.cache.keys]
    try:
        for _ in range(3):
            tokens = [int(t) for t in sampler.sample(logits, state.rows)]  # type: ignore[call-overload]
            state = gen.select(state, [0, 2])  # the middle row finished
            logits = gen.step(state, torch.tensor([tokens[0], tokens[2]]))
            again, more = gen.prefill([Row(rows[1].input_ids, rows[1].audios, SamplingParams())])
            state, logits = gen.merge(state, again), torch.cat([logits, more.to(logits.device)])
        report("split", cache_devices=layers, select_and_merge_work=True, capture=_split_capture(gen, state))
    except Exception as exc:
        report("split", cache_devices=layers, select_and_merge_work=False, error=repr(exc))


def _split_capture(gen: BatchGenerator, state: BatchState) -> str:
    """Whether the step of a model spread over the GPU and the CPU survives `capture` (last: a failed capture
    may leave the stream unusable). Its layers hand the hidden state from one device to the other."""
    if gen.device.type != "cuda":
        return "not on CUDA"
    try:
        gen.capture()
        gen.step(state, [0] * len(state.rows))
        torch.cuda.synchronize()
    except Exception as exc:
        return f"failed: {str(exc).splitlines()[0][:200]}"
    return f"{gen.graphs.captured} graphs captured and a step replayed"


# -- mini --------------------------------------------------------------------------------------------
SMALL_TEXT = {"num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}
SMALL_TEXT |= {"num_key_value_heads": 2, "head_dim": 64}
SMALL_AUDIO = {"num_hidden_layers": 1, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2}
"""`--small`: the CPU smoke test's widths (the projector stacks intermediate / hidden = 4 frames a token, as Mini)."""


def _mini(args: argparse.Namespace, report: Report) -> tuple[Any, Any]:
    """Voxtral Mini's shapes with random weights (bench/random_mini.py), in memory: bfloat16 on a GPU,
    float32 on the CPU; and its processor."""
    from transformers import AutoProcessor

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mini-processor-"))
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    small = {"text": SMALL_TEXT, "audio": SMALL_AUDIO} if args.small else {}
    model = random_mini.model(work, args.device, dtype, **small)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    report("mini_built", seconds=round(time.perf_counter() - started, 1), weight_gib=round(weights / 2**30, 2))
    return model, AutoProcessor.from_pretrained(work)


def mini(args: argparse.Namespace, report: Report) -> None:
    """The sampler's and the prefill's costs (the decode step's: `replay`)."""
    model, processor = _mini(args, report)
    device = next(model.parameters()).device
    log_mel = LogMel(processor.feature_extractor, 3000, device)
    prompter = Prompter(processor, "mini")
    gen = BatchGenerator(model, pad_token_id=11, log_mel=log_mel, cache=CachePlan(slots=32, max_len=1024))
    _sampler_cost(gen, prompter, device, report)
    _prefill_cost(gen, prompter, device, report, 2 if args.small else 32, 30)
    del gen  # its cache: one slot of a 30-minute prompt needs positions, not slots
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds = 30 if args.small else 1800
    long = BatchGenerator(model, pad_token_id=11, log_mel=log_mel, cache=CachePlan(slots=1, max_len=24_576))
    _prefill_cost(long, prompter, device, report, 1, seconds)
    del long
    _format_steps(model, prompter, log_mel, report)


QUANT_ROUNDS = 3


def _format_steps(model: Any, prompter: Prompter, log_mel: LogMel, report: Report) -> None:
    """The decode step per weight format (issue 30): the model as built (none), and copies of it whose decoder
    linear layers torchao quantizes in place (int8 weight-only; fp8 where the GPU has float8, compute
    capability 8.9 or newer), each run by the server's generator (`ModuleDecoder` for the quantized ones,
    eager), at batch 1 and 32, the formats taking turns for `QUANT_ROUNDS` rounds. bitsandbytes' NF4 loads only
    through `from_pretrained` (`--quantization bitsandbytes`), not in place: not here."""
    import copy

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow, quantize_

    from app.model.compute.decoder import forget_fused

    device = next(model.parameters()).device
    configs: dict[str, Any] = {"int8": Int8WeightOnlyConfig()}
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        configs["fp8"] = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    models = {"none": model}
    for name, config in configs.items():
        quantized = copy.deepcopy(model)
        forget_fused(quantized)  # else the copy's fused bf16 weights (~4 GB) outlive its quantization
        quantize_(quantized.model.language_model, config, filter_fn=lambda m, _: isinstance(m, torch.nn.Linear))
        models[name] = quantized
    gens = {name: BatchGenerator(m, 11, log_mel, cache=CachePlan(slots=32, max_len=1024)) for name, m in models.items()}
    for round_ in range(QUANT_ROUNDS):
        for name, gen in gens.items():
            for batch in (1, 32):
                timing = _step_time(gen, prompter, batch, 10)
                report("quant_step", format=name, round=round_, decoder=type(gen.decoder).__name__, **timing)


def _text_rows(prompter: Prompter, count: int) -> list[Row]:
    prompt = prompter.chat([{"role": "user", "content": "Tell me about the weather " * 20}]).input_ids
    return [Row(list(prompt), [], SamplingParams()) for _ in range(count)]


def _sampler_cost(gen: BatchGenerator, prompter: Prompter, device: torch.device, report: Report) -> None:
    state, model_logits = gen.prefill(_text_rows(prompter, 32))
    peaked = torch.randn_like(model_logits) * 4  # a trained model's logits are far from flat
    del state
    for name, logits in (("model_logits", model_logits), ("peaked_logits", peaked)):
        for kind, params in (("greedy", SamplingParams()), ("default", SamplingParams(temperature=0.2, top_p=0.95))):
            rows, sampler = [Row([1], [], params) for _ in range(32)], Sampler()
            for _ in range(3):
                sampler.sample(logits, rows)
            with timed(device) as t:
                for _ in range(20):
                    sampler.sample(logits, rows)
            report("sampler", logits=name, rows=32, kind=kind, ms=round(1000 * t["wall_s"] / 20, 3))


def _prefill_cost(
    gen: BatchGenerator, prompter: Prompter, device: torch.device, report: Report, count: int, seconds: int
) -> None:
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000 * seconds) * 0.1).astype(np.float32)
    encoded = prompter.transcription(audio, "en")
    batch = [Row(encoded.input_ids, encoded.audios, SamplingParams()) for _ in range(count)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with timed(device) as t:
        state, _ = gen.prefill(batch)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    report("prefill", rows=count, audio_s=seconds, prompt_tokens=len(encoded.input_ids), peak_gib=peak, **t)
    del state


# -- replay ------------------------------------------------------------------------------------------
REPLAY_BATCHES = (1, 8, 32, 128)
REPLAY_CACHE = CachePlan(slots=128, max_len=1024)
"""128 slots as the largest batch needs, of 1,024 positions: (128 + 1) x 1,024 x 122,880 B = 16.2 GB of keys and
values beside ~9.4 GB of weights (the audio tower's included), so an 80 GB H100 holds them, the graphs and a
prefill of 128 rows with room to spare (2,048 positions, 32.5 GB, would fit too, at one more width to capture).
The prompts (~130 tokens) and the steps after them stay within 256 positions."""
SMALL_CACHE = CachePlan(slots=8, max_len=256)
TIMED_STEPS = 50
PARITY_STEPS = 16


class Budget:
    """A section's seconds: past them, each part not yet run is skipped with one line saying so, so the
    device call keeps the time of the sections after it."""

    def __init__(self, seconds: float, report: Report, section: str) -> None:
        self.seconds, self.report, self.section = seconds, report, section
        self.started = time.perf_counter()

    def allows(self, part: str) -> bool:
        spent = time.perf_counter() - self.started
        if spent < self.seconds:
            return True
        self.report(self.section, skipped=part, why=f"the section's {self.seconds:.0f} s are spent ({spent:.0f} s)")
        return False


def replay(args: argparse.Namespace, report: Report) -> None:
    """Decode step: eager vs replayed. Mini's shapes, `REPLAY_CACHE`: the step's time at each batch size,
    eager (nothing captured) then replayed (after `capture`, as at start-up), against reading the weights (and
    the keys and values the step reads) once; greedy tokens replayed == eager; the steady step watched for host
    syncs. On a CPU (`--small`) capture is a no-op and both halves run eagerly: the code, not the figures."""
    budget = Budget(args.budget_s, report, "replay")
    model, processor = _mini(args, report)
    device = next(model.parameters()).device
    log_mel = LogMel(processor.feature_extractor, 3000, device)
    prompter = Prompter(processor, "mini")
    gen = BatchGenerator(model, 11, log_mel, cache=SMALL_CACHE if args.small else REPLAY_CACHE)
    floor = _floor(gen, device, report)
    timings = functools.partial(_timings, gen, prompter, report, budget, floor, *_plan(args))
    eager = timings("eager", {})
    reference = (
        _decode(gen, _varied_rows(prompter, 8), PARITY_STEPS, Sampler()) if budget.allows("eager tokens") else None
    )
    if budget.allows("eager sync check"):
        _sync_check(gen, prompter, report, "eager")
    if not budget.allows("capture, and everything replayed"):
        return
    _capture(gen, report)
    timings("replayed", eager)
    if reference is not None and budget.allows("replayed tokens"):
        _replay_parity(gen, prompter, reference, report)
    if budget.allows("replayed sync check"):
        _sync_check(gen, prompter, report, "replayed")


def _plan(args: argparse.Namespace) -> tuple[tuple[int, ...], int]:
    """The batch sizes timed and the steps a median is taken over."""
    return ((1, 8), 5) if args.small else (REPLAY_BATCHES, TIMED_STEPS)


def _timings(
    gen: BatchGenerator,
    prompter: Prompter,
    report: Report,
    budget: Budget,
    floor: dict[str, float],
    batches: tuple[int, ...],
    steps: int,
    mode: str,
    eager: dict[int, dict[str, Any]],
) -> dict[int, dict[str, Any]]:
    """One line for each batch size: the step's median time in this `mode`, against the floor and (replayed)
    against the `eager` time of the same batch."""
    out: dict[int, dict[str, Any]] = {}
    for batch in batches:
        if not budget.allows(f"{mode} step at batch {batch}"):
            continue
        out[batch] = timing = _step_time(gen, prompter, batch, steps)
        fields: dict[str, Any] = {"mode": mode, "batch": batch, **timing}
        if mode == "replayed":
            fields["graphs"] = gen.graphs.captured
            if batch in eager:
                fields["speedup"] = round(eager[batch]["wall_ms"] / timing["wall_ms"], 2)
        report("decode_step", **fields, **_against(floor, gen, timing))
    return out


def _replay_parity(gen: BatchGenerator, prompter: Prompter, reference: list[list[int]], report: Report) -> None:
    """Greedy tokens of the same 8 prompts, replayed, against `reference` (eager)."""
    replayed = _decode(gen, _varied_rows(prompter, 8), PARITY_STEPS, Sampler())
    same = sum(a == b for x, y in zip(replayed, reference, strict=True) for a, b in zip(x, y, strict=True))
    report(
        "replay_parity",
        rows=8,
        steps=PARITY_STEPS,
        replayed_equals_eager=replayed == reference,
        token_agreement_pct=round(100 * same / (8 * PARITY_STEPS), 1),
        graphs=gen.graphs.captured,
        distinct_outputs=len({tuple(r) for r in reference}),
    )


def _floor(gen: BatchGenerator, device: torch.device, report: Report) -> dict[str, float]:
    """What a step must read at least (the decoder's weights and the head; the embedding's few rows aside),
    and the bandwidth it is read at: a measured device-to-device copy (read plus write), which a step can
    approach; the datasheet's peak, where the card is listed, for reference."""
    language = gen.model.model.language_model
    modules = [*language.layers[: gen.num_layers], language.norm, gen.model.lm_head]
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    measured = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    listed = datasheet_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    floor = {"weight_bytes": float(weights), "bandwidth": measured}
    report(
        "floor",
        weight_gb=round(weights / 1e9, 3),
        copy_tb_s=round(measured / 1e12, 3),
        datasheet_tb_s=listed and listed / 1e12,
        floor_ms=round(1000 * weights / measured, 3),
        datasheet_floor_ms=listed and round(1000 * weights / listed, 3),
    )
    return floor


def _against(floor: dict[str, float], gen: BatchGenerator, timing: dict[str, float]) -> dict[str, float]:
    """The step's floor at its shape: the weights, then those and the keys and values its attention reads
    (`rows` slots x `width` positions, padding included), at the measured bandwidth; and the step's wall time
    over each."""
    kv = timing["rows"] * timing["width"] * gen.shape.token_bytes
    weights_ms = 1000 * floor["weight_bytes"] / floor["bandwidth"]
    with_kv_ms = 1000 * (floor["weight_bytes"] + kv) / floor["bandwidth"]
    return {
        "floor_ms": round(weights_ms, 3),
        "floor_kv_ms": round(with_kv_ms, 3),
        "x_floor": round(timing["wall_ms"] / weights_ms, 2),
        "x_floor_kv": round(timing["wall_ms"] / with_kv_ms, 2),
    }


def _step_time(gen: BatchGenerator, prompter: Prompter, batch: int, steps: int) -> dict[str, Any]:
    """Median of `steps` decode steps of `batch` fresh rows, each timed alone from the call to the device's
    end (a serving step ends in a read-back, so none overlaps the next): wall and, on a GPU, CUDA events."""
    device = gen.device
    state, logits = gen.prefill(_text_rows(prompter, batch))
    tokens = logits.argmax(-1).tolist()
    for _ in range(3):
        gen.step(state, tokens)
    walls, events = [], []
    for _ in range(steps):
        with timed(device) as t:
            gen.step(state, tokens)
        walls.append(t["wall_s"])
        events.append(t.get("event_s", t["wall_s"]))
    rows, width = padded(max(state.slots) + 1, gen.sizes), width_of(max(state.lengths), gen.plan.max_len)
    del state, logits
    timing: dict[str, Any] = {"rows": rows, "width": width, "wall_ms": round(1000 * float(np.median(walls)), 3)}
    if device.type == "cuda":
        timing["event_ms"] = round(1000 * float(np.median(events)), 3)
    return timing


def _varied_rows(prompter: Prompter, count: int) -> list[Row]:
    """`count` greedy rows of different prompts and lengths (padding in the prefill, different positions in a step)."""
    prompts = [
        prompter.chat([{"role": "user", "content": f"Question {i}: " + "why " * (3 + 5 * i)}]) for i in range(count)
    ]
    return [Row(p.input_ids, [], SamplingParams()) for p in prompts]


def _capture(gen: BatchGenerator, report: Report) -> None:
    """`gen.capture()` as start-up runs it, with what StepGraphs logs (time, graph memory) and what it costs here."""
    device = gen.device
    lines: list[str] = []
    handler = _Lines(lines)
    logger = logging.getLogger("app.model.compute.graphs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    before = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if device.type == "cuda" else (0, 0)
    started = time.perf_counter()
    try:
        gen.capture()
    finally:
        logger.removeHandler(handler)
    seconds = time.perf_counter() - started
    after = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if device.type == "cuda" else (0, 0)
    report(
        "capture",
        graphs=gen.graphs.captured,
        shapes=f"{len(gen.sizes)} sizes x {len(gen.widths)} widths",
        seconds=round(seconds, 2),
        allocated_gib=round((after[0] - before[0]) / 2**30, 3),
        reserved_gib=round((after[1] - before[1]) / 2**30, 3),
        log=lines,
    )


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


SYNC_ROWS = (
    SamplingParams(),
    SamplingParams(temperature=0.2, top_p=0.95, seed=1),
    SamplingParams(logprobs=2),
    SamplingParams(temperature=0.7, top_k=50, presence_penalty=0.5, frequency_penalty=0.2, logprobs=0, seed=3),
)
"""The sync check's rows, twice over: greedy, the default chat sampling, log-probs, penalties with top_k."""
READ_BACK = ("sampling.py", ".tolist()")
"""Where the one read-back of a step is: `_choose` in app/model/compute/sampling.py (the ids, the redraw flags and
the asked log-probs in one tensor; a row drawn again from more candidates reads once more, only then)."""


def _sync_check(gen: BatchGenerator, prompter: Prompter, report: Report, mode: str) -> None:
    """The steady loop of the engine worker (`Sampler.step`, then `gen.step` with the host ids) at 8 rows: each
    decode step under `torch.cuda.set_sync_debug_mode("error")`, so any sync in it raises; the sampler under
    "warn", each sync recorded with its source line, so the documented read-back (`READ_BACK`) is told from
    any other, which fails the check. (Under "error" the sampler's read-back itself would raise: it is the one
    sync a step needs.) On a CPU nothing syncs: the loop runs, unwatched."""
    prompt = prompter.chat([{"role": "user", "content": "Tell me about the weather " * 20}]).input_ids
    rows = [Row(list(prompt), [], SYNC_ROWS[i % len(SYNC_ROWS)], index=i) for i in range(8)]
    steps = 12
    sites, step_error = _watched_loop(gen, rows, steps)
    reads = sum(n for site, n in sites.items() if _is_read_back(site))
    others = sum(n for site, n in sites.items() if not _is_read_back(site))
    watched = gen.device.type == "cuda"
    report(
        "sync",
        mode=mode,
        rows=len(rows),
        steps=steps,
        watched=watched,
        step_error=step_error,
        read_backs=reads,
        other_syncs=others,
        sampler_syncs=dict(sites),
        ok=(step_error is None and not others and reads >= steps) if watched else None,
    )


def _watched_loop(gen: BatchGenerator, rows: list[Row], steps: int) -> tuple[Counter[str], str | None]:
    """Prefill `rows`, then sample and step: two steps unwatched (lazy set-ups, such as cuBLAS's workspace,
    may sync once), `steps` watched. The sampler's syncs by site; the decode step's first sync, if any."""
    sampler, sites = Sampler(), Counter[str]()
    state, logits = gen.prefill(rows)
    for i in range(steps + 2):
        with _watch(gen.device, "warn" if i >= 2 else None) as seen:
            sampled = sampler.step(logits, state.rows)
        sites.update(seen)
        tokens = [s.token if isinstance(s, Sampled) else 0 for s in sampled]
        for row, token in zip(state.rows, tokens, strict=True):
            row.generated.append(token)
        try:
            with _watch(gen.device, "error" if i >= 2 else None):
                logits = gen.step(state, tokens)
        except RuntimeError as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            where = _site(frames, f"{frames[-1].filename}:{frames[-1].lineno}")
            return sites, f"{where}: {str(exc).splitlines()[0][:200]}"
    return sites, None


def _is_read_back(site: str) -> bool:
    return site.split(":")[0].endswith(READ_BACK[0]) and READ_BACK[1] in site


@contextmanager
def _watch(device: torch.device, mode: str | None) -> Iterator[list[str]]:
    """The block under `torch.cuda.set_sync_debug_mode(mode)` on CUDA: "error", a sync raises; "warn", each
    one is listed by where the server's code asked for it (`_site`). None, or a CPU: nothing is watched."""
    seen: list[str] = []
    if mode is None or device.type != "cuda":
        yield seen
        return

    def note(message: Warning | str, category: Any, filename: str, lineno: int, *_: Any, **__: Any) -> None:
        if "synchroniz" in str(message):
            seen.append(_site(traceback.extract_stack(), f"{filename}:{lineno}"))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(0)


def _site(frames: traceback.StackSummary, elsewhere: str) -> str:
    """Where the server's code asked for a sync, as "path:line source": the innermost frame in app/ (not
    torch's Python wrappers, nor this script); `elsewhere` when no frame is in app/."""
    app = [f for f in frames if Path(f.filename).resolve().is_relative_to(ROOT / "app")]
    if not app:
        return elsewhere
    frame = app[-1]
    return f"{Path(frame.filename).resolve().relative_to(ROOT)}:{frame.lineno} {(frame.line or '').strip()}"


SECTIONS: dict[str, Callable[[argparse.Namespace, Report], None]] = {
    "env": env,
    "parity": parity,
    "split": split,
    "mini": mini,
    "replay": replay,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="+", choices=list(SECTIONS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke test of the script itself")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "voxtral-gpu-check")
    parser.add_argument("--out", type=Path, default=None, help="append each JSON line here too")
    parser.add_argument("--budget-s", type=float, default=150, help="replay: past this, skip its remaining parts")
    args = parser.parse_args()
    report = Report(args.out)
    for name in args.sections:
        try:
            SECTIONS[name](args, report)
        except Exception as exc:  # one broken section must not lose the others' figures
            report(name, error=repr(exc)[:500])


if __name__ == "__main__":
    main()
