"""The KV cache budget (app/model/compute/budget.py): what --gpu-memory-utilization leaves on each GPU once the
weights and a prefill's reserve are counted, a fixed budget on a CPU, --kv-cache-memory-bytes over both; and the
cache the loader expects the settings to ask for (app/model/compute/loader.py: `kv_wanted`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.config import Settings
from app.model.compute.budget import (
    ACTIVATION_COPIES,
    FP8_INPUT_BYTES,
    OVERHEAD_BYTES,
    SAMPLER_COPIES,
    DeviceMemory,
    activation_reserve,
    kv_budget,
    physical_memory,
    plan_cache,
)
from app.model.compute.generate import CPU_CACHE_BYTES
from app.model.compute.loader import GIB, LoadedModel, kv_wanted
from app.model.compute.slots import CacheShape, plan
from tests.support.server import make_settings

MINI = SimpleNamespace(
    num_hidden_layers=30,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=3072,
    intermediate_size=8192,
    vocab_size=131072,
)
"""Voxtral Mini's text model."""
H100 = 80 * GIB


def test_the_override_wins_on_any_device_and_a_cpu_has_its_fixed_budget() -> None:
    gpu = [DeviceMemory(H100, 9 * GIB, 30)]
    assert kv_budget(gpu, 0.9, GIB, override=123) == 123
    assert kv_budget([], 0.9, GIB, override=123) == 123
    assert kv_budget([], 0.9, GIB, override=None) == physical_memory() > CPU_CACHE_BYTES  # this machine's RAM


def test_one_gpu_gives_what_the_utilization_leaves_past_the_weights_and_the_reserve() -> None:
    assert kv_budget([DeviceMemory(H100, 9 * GIB, 30)], 0.9, 6 * GIB, None) == int(0.9 * H100) - 15 * GIB
    assert kv_budget([DeviceMemory(H100, 9 * GIB, 30)], 0.1, 6 * GIB, None) == 0  # nothing left: never negative


def test_several_gpus_give_what_the_fullest_allows_for_its_share_of_the_layers() -> None:
    """Each GPU holds its layers' part of every slot: the one with the least room per layer decides."""
    roomy, full = DeviceMemory(100, 10, 20), DeviceMemory(100, 70, 10)  # room 90 for 20 layers, 30 for 10
    assert kv_budget([roomy, full], 1.0, 0, None) == 90  # 30 per 10 layers: 90 for all 30
    assert kv_budget([roomy, DeviceMemory(100, 10, 0)], 1.0, 0, None) == 90  # a GPU without layers holds none


def test_the_reserve_is_a_prefills_keys_values_activations_and_mask_the_sampler_and_the_overhead() -> None:
    shape = CacheShape.of(MINI, torch.bfloat16)
    assert shape.token_bytes == 2 * 30 * 8 * 128 * 2  # 120 KiB a position
    per_token = ACTIVATION_COPIES * (3072 + 8192) * 2 + 2 * 32 * 128 * 2  # activations, repeated keys and values
    fresh = 32768 * shape.token_bytes + 32768 * 16384 * (1 + 2)  # 2 rows x 16,384 x 16,384: bool + bf16 mask
    got = activation_reserve(MINI, torch.bfloat16, 32768, context=32768)
    assert got == 32768 * per_token + fresh + OVERHEAD_BYTES
    assert 8.8 * GIB < got < 9 * GIB
    assert activation_reserve(MINI, torch.bfloat16, 8192, context=32768) < got
    # a long cached start: the mask of the rest of the prompt (queries x every position) outgrows a fresh prefill
    long = activation_reserve(MINI, torch.bfloat16, 8192, context=131072)
    assert long == 8192 * per_token + 8192 * 131072 * 3 + OVERHEAD_BYTES
    sampler = activation_reserve(MINI, torch.bfloat16, 32768, context=32768, rows=256) - got
    assert sampler == 256 * 131072 * SAMPLER_COPIES * 4 == GIB
    # --quantization fp8: torchao quantizes each layer's input in float32 first, the MLP's widest
    fp8 = activation_reserve(MINI, torch.bfloat16, 32768, context=32768, fp8=True) - got
    assert fp8 == 32768 * 8192 * FP8_INPUT_BYTES


def test_voxtral_mini_on_an_h100_fits_fewer_slots_of_32768_positions_than_of_8192() -> None:
    """The arithmetic behind the README's GPU table: Mini's weights (8.8 GiB) at the default settings."""
    shape = CacheShape.of(MINI, torch.bfloat16)
    budget = kv_budget(
        [DeviceMemory(H100, int(8.8 * GIB), 30)], 0.9, activation_reserve(MINI, torch.bfloat16, 32768), None
    )
    assert plan(shape, 32, 32768, budget).slots < 32 <= plan(shape, 32, 8192, budget).slots


@pytest.mark.parametrize("utilization", [0.0, -0.1, 1.01])
def test_a_utilization_outside_zero_to_one_is_refused(utilization: float) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization must be greater than 0 and at most 1"):
        Settings(gpu_memory_utilization=utilization)
    assert Settings(gpu_memory_utilization=1.0).gpu_memory_utilization == 1.0


def test_an_empty_kv_cache_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_cache_memory_bytes must be at least 1"):
        Settings(kv_cache_memory_bytes=0)


def test_the_loader_expects_max_batch_size_slots_and_the_scratch_of_context_length(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"text_config": vars(MINI)}))
    asked = Settings(max_batch_size=7, context_length=1000)
    assert kv_wanted(asked, tmp_path, torch.bfloat16) == 8 * 1000 * CacheShape.of(MINI, torch.bfloat16).token_bytes
    assert kv_wanted(Settings(kv_cache_memory_bytes=5 * GIB), tmp_path, torch.bfloat16) == 5 * GIB
    assert kv_wanted(asked, None, torch.bfloat16) == 0  # a hub checkpoint not downloaded yet: unknown


def test_a_tensor_parallel_rank_plans_its_share_of_the_kv_heads() -> None:
    """Each of 2 ranks on its own H100 holds 4 of Mini's 8 KV heads: a position costs half, so the same GPU
    holds at least twice the slots (the reserve's per-rank keys, values and MLP width are smaller too)."""
    whole, half = CacheShape.of(MINI, torch.bfloat16), CacheShape.of(MINI, torch.bfloat16).per_rank(2)
    assert half.kv_heads == 4 and half.token_bytes * 2 == whole.token_bytes
    per_token = half.token_bytes + ACTIVATION_COPIES * (3072 + 8192 // 2) * 2 + 2 * 16 * 128 * 2
    mask = 8192 * 4096 * 3
    assert activation_reserve(MINI, torch.bfloat16, 8192, ranks=2) == 8192 * per_token + mask + OVERHEAD_BYTES
    gpu = [DeviceMemory(H100, int(4.4 * GIB), 30)]  # half of Mini's decoder on each rank
    one = plan(whole, 10**6, 32768, kv_budget(gpu, 0.9, activation_reserve(MINI, torch.bfloat16, 8192), None))
    two = plan(half, 10**6, 32768, kv_budget(gpu, 0.9, activation_reserve(MINI, torch.bfloat16, 8192, 2), None, 2))
    assert two.slots >= 2 * one.slots + 1  # slots + 1 (the scratch) double at least
    with pytest.raises(ValueError, match="8 KV heads do not split evenly over 3"):
        whole.per_rank(3)


def test_ranks_on_one_cpu_share_its_memory_and_the_override_is_per_rank() -> None:
    assert kv_budget([], 0.9, GIB, None, ranks=2) == physical_memory() // 2
    assert kv_budget([], 0.9, GIB, 123, ranks=2) == 123  # --kv-cache-memory-bytes: per rank, as vLLM's per GPU


def test_the_plan_rank_0_sends_holds_twice_the_slots_of_half_the_heads(loaded: LoadedModel, tiny_dir: Path) -> None:
    """`plan_cache` on the tiny model as rank 0 of 2 sees it (the config is all it reads): the same
    --kv-cache-memory-bytes gives each rank twice the slots, as each holds half of every position."""
    shape = CacheShape.of(loaded.model.config.text_config, loaded.model.dtype)
    budget = 9 * 256 * shape.token_bytes  # 8 slots and the scratch in one process
    settings = make_settings(tiny_dir, kv_cache_memory_bytes=budget, context_length=256, max_batch_size=64)
    assert plan_cache(loaded.model, settings).slots == 8
    assert plan_cache(loaded.model, settings.model_copy(update={"tensor_parallel_size": 2})).slots == 17
