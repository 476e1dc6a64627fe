"""How much memory the KV cache may take, and so how many rows decode at once: the slot plan of a loaded model.

On CUDA the cache gets what `--gpu-memory-utilization` of each GPU leaves once the weights are loaded and a
reserve is set aside for what a prefill and the decode step allocate (vLLM sizes its cache the same way, from
a profiling run; here the reserve is arithmetic, `activation_reserve`). On a CPU the budget is the machine's
physical memory: the cache is allocated untouched and a process holds only the positions its steps read
(app/model/compute/slots.py), about what --max-running-tokens allows. `--kv-cache-memory-bytes` overrides both.
The plan is then as many slots of `--context-length` positions as the budget holds, at most `--max-batch-size`
(app/model/compute/slots.py: `plan`); one that holds none fails the start-up in one line.

Under `--tensor-parallel-size N` the plan is one rank's: each rank's cache holds its N-th of the KV heads
(`CacheShape.per_rank`) within its own budget (its own GPU; on a CPU, its N-th of the machine's RAM, which the
ranks share; `--kv-cache-memory-bytes` is per rank, as vLLM's is per GPU). Rank 0 plans, and sends the plan
to the others (app/model/compute/parallel.py), so every rank has the same slots.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.config import Settings
from app.model.compute.generate import CPU_CACHE_BYTES
from app.model.compute.loader import GIB, ModelLoadError
from app.model.compute.slots import CachePlan, CacheShape, layer_devices, plan

log = logging.getLogger(__name__)

ACTIVATION_COPIES = 3
"""[tokens, hidden + intermediate] tensors a prefill holds at its peak inside one decoder layer: the MLP's
activated gate, its up projection and their product, beside the residual stream, the normed input and the
layer's output. The audio encoder runs before the decoder layers and frees its activations first; for
Voxtral's shapes its peak per audio token is lower."""
OVERHEAD_BYTES = GIB
"""What the reserve adds whatever the batch: the CUDA context and cuBLAS workspaces (which torch does not count
in the memory it holds) and the decode step's graphs (their pool, the driver's part). The memory past
--gpu-memory-utilization is the margin for what this misjudges."""
FP8_INPUT_BYTES = 11
"""Bytes an element of a linear layer's input costs beyond the bf16 copies when torchao quantizes it to fp8 in
plain PyTorch (a float32 copy, its scaled and clamped float32 results, the fp8 one), for the widest input: the
MLP's down projection, [tokens, intermediate]."""
SAMPLER_COPIES = 8
"""[rows, vocab] float32 tensors a step holds at once, from the decode step's logits to the draw: the logits,
penalties and grammar masks applied to a copy, softmax, a float64 running sum (two), log-probs."""


@dataclass(frozen=True)
class DeviceMemory:
    """One GPU the model uses, measured after loading the weights."""

    total: int
    held: int
    """Bytes torch holds there: the weights placed on it."""
    layers: int
    """Decoder layers placed on it: its share of the cache."""


def activation_reserve(
    text_config: Any,
    dtype: torch.dtype,
    tokens: int,
    ranks: int = 1,
    *,
    context: int = 0,
    rows: int = 0,
    fp8: bool = False,
) -> int:
    """Bytes a prefill of `tokens` (--max-batch-tokens) and a decode step of `rows` (--max-batch-size) need
    beside the weights and the slot cache, plus `OVERHEAD_BYTES`; on one of `ranks` tensor-parallel ranks, its
    share of the heads and of the MLP's intermediate width (the residual stream is whole on every rank):

    - a layer's widest activations (`ACTIVATION_COPIES`), and its query heads' keys and values, which
      transformers' sdpa attention repeats out of the KV heads when it is given a mask;
    - the larger of: a fresh prefill's own keys and values, held until they are placed in slots, with its
      attention mask (a boolean and the kernel's copy in `dtype`: rows x width x width, padded rows of at most
      half `tokens` each, width at most `context`); and the mask of the rest of a prompt whose start is cached
      (no keys held: they go to its slot; its queries x cached-and-new positions, at most `tokens` x `context`);
    - the sampler's `SAMPLER_COPIES` float32 rows of the vocabulary a decode row;
    - with `fp8` (--quantization fp8), each token's widest input quantized (`FP8_INPUT_BYTES`).

    An upper bound by arithmetic, not a measurement: a smaller --max-batch-tokens leaves the cache more."""
    shape = CacheShape.of(text_config, dtype).per_rank(ranks)
    size = torch.empty((), dtype=dtype).element_size()
    intermediate = int(getattr(text_config, "intermediate_size", 0) or 0) // ranks
    width = int(text_config.hidden_size) + intermediate
    repeated = 2 * int(text_config.num_attention_heads) // ranks * shape.head_dim * size
    per_token = ACTIVATION_COPIES * width * size + repeated
    context = context or tokens
    fresh = tokens * shape.token_bytes + tokens * min(context, tokens // 2) * (1 + size)
    extend = tokens * context * (1 + size)
    sampler = rows * int(text_config.vocab_size) * SAMPLER_COPIES * 4
    quantizing = tokens * intermediate * FP8_INPUT_BYTES if fp8 else 0
    return tokens * per_token + max(fresh, extend) + sampler + quantizing + OVERHEAD_BYTES


def kv_budget(
    devices: Sequence[DeviceMemory], utilization: float, reserve: int, override: int | None, ranks: int = 1
) -> int:
    """Bytes the whole KV cache (of one of `ranks` tensor-parallel ranks) may take: `override` when given;
    `physical_memory()` without a GPU, shared out among the ranks; else the least any GPU allows, each holding
    its layers' share of every slot: `utilization` x its total, less what torch holds there and `reserve` (on
    each GPU, as each runs its layers' prefill), scaled from its share to the whole. Never negative. Pure:
    sizes in bytes."""
    if override is not None:
        return override
    if not devices:
        return physical_memory() // ranks
    layers = sum(d.layers for d in devices)
    room = [(int(utilization * d.total) - d.held - reserve) * layers // d.layers for d in devices if d.layers]
    return max(0, min(room))


def physical_memory() -> int:
    """The machine's RAM in bytes (`CPU_CACHE_BYTES` where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return CPU_CACHE_BYTES


def device_memory(model: Any) -> list[DeviceMemory]:
    """Each GPU the model's decoder layers are on, as it is now (none: a CPU model)."""
    indices = [d.index or 0 for d in layer_devices(model) if d.type == "cuda"]
    return [
        DeviceMemory(torch.cuda.mem_get_info(i)[1], torch.cuda.memory_allocated(i), indices.count(i))
        for i in sorted(set(indices))
    ]


def plan_cache(model: Any, settings: Settings) -> CachePlan:
    """The slot plan for `model` as loaded, within the settings' budget; logged. Raises `ModelLoadError` (the
    start-up fails in one line) when the budget holds no slot."""
    text, ranks = model.config.text_config, settings.tensor_parallel_size
    shape = CacheShape.of(text, model.dtype).per_rank(ranks)
    reserve = activation_reserve(
        text,
        model.dtype,
        settings.max_batch_tokens,
        ranks,
        context=settings.context_length,
        rows=settings.max_batch_size,
        fp8=settings.quantization == "fp8",
    )
    reserve += settings.encoder_cache_memory_bytes
    devices = device_memory(model)
    budget = kv_budget(devices, settings.gpu_memory_utilization, reserve, settings.kv_cache_memory_bytes, ranks)
    try:
        cache = plan(shape, settings.max_batch_size, settings.context_length, budget)
    except ValueError as exc:
        raise ModelLoadError(f"{exc}{_why(devices, reserve, settings)}") from exc
    where = ", ".join(sorted({str(d) for d in layer_devices(model)}))
    gib = cache.bytes(shape) / GIB
    each = f" (each of {ranks} ranks: {shape.kv_heads} KV heads)" if ranks > 1 else ""
    log.info("KV cache: %d slots of %d positions, %.2f GiB on %s%s", cache.slots, cache.max_len, gib, where, each)
    if cache.slots < settings.max_batch_size:
        _warn_capped(cache, settings.max_batch_size, budget // shape.token_bytes)
    return cache


def _why(devices: Sequence[DeviceMemory], reserve: int, settings: Settings) -> str:
    """Where a GPU's budget went, when it holds no slot."""
    if not devices or settings.kv_cache_memory_bytes is not None:
        return ""
    held = ", ".join(f"{d.held / GIB:.1f} of {d.total / GIB:.1f} GiB" for d in devices)
    return (
        f" (--gpu-memory-utilization {settings.gpu_memory_utilization}; the weights hold {held}; a prefill's "
        f"activations are given {reserve / GIB:.1f} GiB, lower --max-batch-tokens to give them less)"
    )


def _warn_capped(cache: CachePlan, max_rows: int, positions: int) -> None:
    """The budget holds fewer slots than --max-batch-size: say so, and what would hold them all."""
    fits = positions // (max_rows + 1)
    log.warning(
        "the KV cache holds %d slots of %d positions, fewer than --max-batch-size %d: at most %d rows decode at once. "
        "To decode %d, lower --context-length (--max-model-len) to %d, or raise --gpu-memory-utilization "
        "(--kv-cache-memory-bytes)",
        cache.slots,
        cache.max_len,
        max_rows,
        cache.slots,
        max_rows,
        fits,
    )


def stream_count(per_stream: int, wanted: int, budget: int) -> int:
    """Voxtral Realtime streams the budget holds: `wanted` (--realtime-max-streams), or as many of `per_stream`
    bytes as fit in `budget` (the pool also holds one scratch slot). ValueError when not one fits. Pure."""
    fits = budget // per_stream - 1
    if fits < 1:
        raise ValueError(
            f"The KV cache budget ({budget / GIB:.2f} GiB) holds no realtime stream: each takes "
            f"{per_stream / GIB:.2f} GiB, and the pool one more for its scratch slot"
        )
    return min(wanted, fits)


def plan_streams(model: Any, settings: Settings, per_stream: int) -> int:
    """How many realtime streams to allocate for `model` as loaded (`per_stream`: one stream's cache bytes),
    from the same budget as the slot cache (a tick's activations reserved as a prefill of --max-batch-tokens
    would be); logged. Raises `ModelLoadError` (the start-up fails in one line) when not one fits."""
    reserve = activation_reserve(model.config.text_config, model.dtype, settings.max_batch_tokens)
    devices = device_memory(model)
    budget = kv_budget(devices, settings.gpu_memory_utilization, reserve, settings.kv_cache_memory_bytes)
    try:
        streams = stream_count(per_stream, settings.realtime_max_streams, budget)
    except ValueError as exc:
        raise ModelLoadError(f"{exc}{_why(devices, reserve, settings)}") from exc
    log.info(
        "realtime streams: %d (of --realtime-max-streams %d), %.3f GiB each, %.2f GiB in all",
        streams,
        settings.realtime_max_streams,
        per_stream / GIB,
        per_stream * (streams + 1) / GIB,
    )
    return streams
