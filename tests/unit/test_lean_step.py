"""The lean decode step (app/model/compute/decoder.py) as a GPU runs it, checked on the CPU: the ops it launches
a layer (counted with bench/step_cost.py's rule), the shared logits buffer every CUDA graph writes, and the
output layouts CUDA's attention kernels return."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tests.support import bench_scripts


def _bench() -> ModuleType:
    return bench_scripts.load("step_cost")


def _step_ops(model_dir: Path, layers: int, rows: int) -> Counter[str]:
    """The compute ops of one lean decode step of a `layers`-deep tiny model over `rows` rows."""
    bench = _bench()
    gen = bench.generator(bench.build(model_dir, layers, seed=0), max_len=512, slots=rows)
    from app.model.compute.generate import Row
    from app.types import SamplingParams

    state, _ = gen.prefill([Row(bench.prompt(i, 40), [], SamplingParams()) for i in range(rows)])
    tokens = [100 + i for i in range(rows)]
    gen.step(state, tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen.step(state, tokens)
    ops: Counter[str] = bench.compute_ops(event.name for event in prof.events())
    return ops


def test_the_lean_step_launches_42_ops_a_layer(tmp_path: Path) -> None:
    """Issue 26's launch budget (<= 45 a layer) as a count that can regress: per layer, ONE fused QKV and ONE
    gate-up projection (4 matmuls in all), ONE cache write for keys and values, ONE attention call."""
    from app.model.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", seed=0)
    shallow, deep = _step_ops(model_dir, 2, 3), _step_ops(model_dir, 6, 3)
    bench = _bench()
    layer = bench.per_layer(deep, shallow, 6)
    assert sum(layer.values()) <= 42, layer
    assert layer["aten::mm"] == 4 and layer["aten::index_put_"] == 1
    assert layer["aten::scaled_dot_product_attention"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_writes_its_logits_into_a_shared_buffer(tmp_path: Path, dtype: torch.dtype) -> None:
    """What every captured graph does (app/model/compute/graphs.py): logits written into rows of one buffer,
    the same numbers as a step that returns its own, and no more ops (the head's matmul writes there, or the
    float32 conversion does)."""
    bench = _bench()
    model, decoder, cache = _two_layers(tmp_path, dtype)
    packed = torch.tensor([[5, 6, 11, 11], [3, 7, 0, 0], [0, 1, 4, 4], [1, 0, 0, 0]])
    buffer = torch.full((8, model.config.text_config.vocab_size), float("nan"))
    with torch.inference_mode():  # as BatchGenerator steps and captures
        want = decoder(packed, 128, cache)
        with profile(activities=[ProfilerActivity.CPU]) as alone:
            decoder(packed, 128, cache)
        with profile(activities=[ProfilerActivity.CPU]) as shared:
            got = decoder(packed, 128, cache, buffer[:4])
    assert got.data_ptr() == buffer.data_ptr() and got.dtype == torch.float32
    assert torch.equal(buffer[:4], want) and bool(buffer[4:].isnan().all())
    count = [bench.compute_ops(e.name for e in p.events()).total() for p in (alone, shared)]
    assert count[1] <= count[0], count


def _two_layers(tmp_path: Path, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """A 2-layer tiny model in `dtype`, its lean decoder, and a slot cache of 4 slots whose first 128
    positions are safe to read."""
    from app.model.compute.decoder import decoder_for
    from app.model.compute.slots import CachePlan, CacheShape, SlotCache
    from app.model.tiny import build_tiny_model

    model = _bench().build(build_tiny_model(tmp_path / "tiny", seed=0), 2, seed=0).to(dtype)
    shape = CacheShape.of(model.config.text_config, dtype)
    cache = SlotCache(shape, CachePlan(4, 256), [torch.device("cpu")] * 2)
    cache.ready(128, 5)
    return model, decoder_for(model), cache


def test_attention_output_in_cuda_memory_efficient_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a mask, CUDA runs the memory-efficient kernel, whose output is [rows, kv_heads, group, head_dim]
    over memory laid out [rows, group, kv_heads, head_dim] (a transpose, not contiguous: what
    `aten._scaled_dot_product_efficient_attention` returns on the meta device too). The step must give the
    same logits from that layout as from the CPU kernel's contiguous one."""

    meta = [torch.empty(s, device="meta") for s in ((3, 2, 2, 16), (3, 2, 128, 16), (3, 2, 128, 16), (3, 1, 1, 128))]
    assert not torch.ops.aten._scaled_dot_product_efficient_attention(*meta, False)[0].is_contiguous()
    _, decoder, cache = _two_layers(tmp_path, torch.float32)
    packed = torch.tensor([[5, 6, 11], [3, 7, 0], [0, 1, 4], [1, 0, 2]])
    kernel = F.scaled_dot_product_attention

    def cuda_layout(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = kernel(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # the same numbers, laid out as CUDA's

    with torch.inference_mode():
        want = decoder(packed, 128, cache)
        monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout)
        got = decoder(packed, 128, cache)
    assert torch.equal(got, want)


def test_a_copy_of_a_fused_model_can_forget_its_fused_weights(tmp_path: Path) -> None:
    """`fuse` leaves each fused weight on its first module; a copy about to be quantized in place drops them
    (`forget_fused`), so nothing but the modules' own weights keeps that memory alive."""
    import copy

    from app.model.compute.decoder import _FUSED, forget_fused

    model, _, _ = _two_layers(tmp_path, torch.float32)
    twin = copy.deepcopy(model)
    assert any(hasattr(m, _FUSED) for m in twin.modules())
    forget_fused(twin)
    assert not any(hasattr(m, _FUSED) for m in twin.modules())
    q = twin.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, model.model.language_model.layers[0].self_attn.q_proj.weight)
