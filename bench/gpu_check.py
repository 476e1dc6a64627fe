"""The server at real scale on one GPU, section by section, each result a JSON line as soon as it exists.

Sections (bench/gpu_check.sh runs them in this order, each under its own time limit):
  env       versions, GPU, free memory
  parity    the tiny model on CUDA: float32 engine == model.generate, alone and in a batch of 8, and
            batched == alone; bfloat16: the percentage of tokens that agree
  split     the tiny model split over cuda:0 and the CPU, as `--device auto` splits a large model over
            GPUs: a row leaving the batch used to fail every row (the row index lived on one device)
  mini      a model with Voxtral Mini's shapes and random bfloat16 weights, built in memory: decode step
            wall and CUDA-event time at batch 1 to 128 against reading its weights once; the sampler for
            32 rows, greedy against the default 0.2 / top_p 0.95; prefill time and peak memory for 32
            rows of 30 s and for one row of 30 minutes

    python bench/gpu_check.py env parity split mini --out /tmp/gpu_check.jsonl
    python bench/gpu_check.py parity split mini --device cpu --small     # a smoke test without a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
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
from app.model.text.prompts import Encoded, Prompter  # noqa: E402
from app.types import SamplingParams  # noqa: E402

WEIGHT_BYTES_MINI = 7.2e9
"""Voxtral Mini's bf16 decoder and head: reading them once is the floor of a decode step."""
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


def floor_bandwidth(device: torch.device) -> tuple[float, str]:
    """The memory bandwidth a step's floor is taken at, and where it comes from: the card's datasheet
    figure by its name, or a measured copy where the name is not listed."""
    listed = datasheet_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if listed is not None:
        return listed, "datasheet"
    return copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26), "measured copy"


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
    layers = [str(k.device) for k, _ in state.cache.kv()]
    naive = _naive_select_fails(state, gen.device)
    try:
        for _ in range(3):
            tokens = [int(t) for t in sampler.sample(logits, state.rows)]  # type: ignore[call-overload]
            state = gen.select(state, [0, 2])  # the middle row finished
            logits = gen.step(state, torch.tensor([tokens[0], tokens[2]]))
            again, more = gen.prefill([Row(rows[1].input_ids, rows[1].audios, SamplingParams())])
            state, logits = gen.merge(state, again), torch.cat([logits, more.to(logits.device)])
        report("split", cache_devices=layers, select_and_merge_work=True, old_index_select_fails=naive)
    except Exception as exc:
        report(
            "split", cache_devices=layers, select_and_merge_work=False, error=repr(exc), old_index_select_fails=naive
        )


def _naive_select_fails(state: BatchState, device: torch.device) -> bool | str:
    """What the code did before: one row index, made on the first parameter's device, for every layer."""
    index = torch.tensor([0], device=device)
    try:
        for k, _ in state.cache.kv():
            torch.index_select(k, 0, index)
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:120]
    return False


# -- mini --------------------------------------------------------------------------------------------
def _mini(args: argparse.Namespace) -> tuple[Any, Any]:
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration

    from app.model.tiny import AUDIO_TOKEN_ID, NUM_SPECIAL, save_processor

    work = Path(tempfile.mkdtemp(prefix="mini-processor-"))
    tokenizer = save_processor(work, num_vocab=131_072 - NUM_SPECIAL)
    text: dict[str, Any] = {"model_type": "llama", "vocab_size": len(tokenizer), "bos_token_id": 1}
    text |= {"eos_token_id": 2, "pad_token_id": 11}
    audio: dict[str, Any] = {"model_type": "voxtral_encoder"}
    if args.small:
        text |= {"num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}
        text |= {"num_key_value_heads": 2, "head_dim": 64}
        # the projector stacks intermediate_size / hidden_size frames a token: 4, as in Mini
        audio |= {"num_hidden_layers": 1, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2}
    config = VoxtralConfig(audio_config=audio, text_config=text, audio_token_id=AUDIO_TOKEN_ID)
    config.save_pretrained(work)  # the processor is read back as a checkpoint's would be
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    with torch.device(args.device):
        model = VoxtralForConditionalGeneration(config).to(dtype).eval()
    from transformers import AutoProcessor

    return model, AutoProcessor.from_pretrained(work)


def mini(args: argparse.Namespace, report: Report) -> None:
    started = time.perf_counter()
    model, processor = _mini(args)
    device = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    report("mini_built", seconds=round(time.perf_counter() - started, 1), weight_gib=round(weights / 2**30, 2))
    log_mel = LogMel(processor.feature_extractor, 3000, device)
    gen, prompter = BatchGenerator(model, pad_token_id=11, log_mel=log_mel), Prompter(processor, "mini")
    _decode_steps(gen, prompter, device, report, [1, 8] if args.small else [1, 8, 32, 64, 128])
    _sampler_cost(gen, prompter, device, report)
    _prefill_cost(gen, prompter, device, report, 2 if args.small else 32, 1 if args.small else 60)


def _text_rows(prompter: Prompter, count: int) -> list[Row]:
    prompt = prompter.chat([{"role": "user", "content": "Tell me about the weather " * 20}]).input_ids
    return [Row(list(prompt), [], SamplingParams()) for _ in range(count)]


def _decode_steps(
    gen: BatchGenerator, prompter: Prompter, device: torch.device, report: Report, batches: list[int]
) -> None:
    bandwidth, source = floor_bandwidth(device)
    bound_ms = 1000 * WEIGHT_BYTES_MINI / bandwidth
    report("floor", bandwidth_tb_s=round(bandwidth / 1e12, 3), source=source, bound_ms=round(bound_ms, 3))
    for batch in batches:
        state, logits = gen.prefill(_text_rows(prompter, batch))
        tokens = logits.argmax(-1)
        for _ in range(3):
            logits = gen.step(state, tokens)
        with timed(device) as t:
            for _ in range(20):
                logits = gen.step(state, tokens)
        fields = {k: round(1000 * v / 20, 3) for k, v in t.items()}
        report("decode_step", batch=batch, **{f"{k[:-2]}_ms": v for k, v in fields.items()}, bound_ms=bound_ms)
        del state, logits


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
    gen: BatchGenerator, prompter: Prompter, device: torch.device, report: Report, rows: int, windows: int
) -> None:
    rng = np.random.default_rng(0)
    for count, seconds in ((rows, 30), (1, 30 * windows)):
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


SECTIONS: dict[str, Callable[[argparse.Namespace, Report], None]] = {
    "env": env,
    "parity": parity,
    "split": split,
    "mini": mini,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="+", choices=list(SECTIONS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke test of the script itself")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "voxtral-gpu-check")
    parser.add_argument("--out", type=Path, default=None, help="append each JSON line here too")
    args = parser.parse_args()
    report = Report(args.out)
    for name in args.sections:
        try:
            SECTIONS[name](args, report)
        except Exception as exc:  # one broken section must not lose the others' figures
            report(name, error=repr(exc)[:500])


if __name__ == "__main__":
    main()
