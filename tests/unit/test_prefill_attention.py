"""How the generator's prefills call attention (app/model/compute/generate.py, attention.py): rows right-padded,
any cached prefix the same length for all, so every call's mask is causal aligned to the lower right and nothing
else (what lets a GPU's flash kernel drop it and run causal); on this CPU the KV heads are read in place
(`enable_gqa`, no `repeat_kv` copy), and with no cached prefix SDPA runs its own causal with no mask. A padding
mask instead made transformers expand the keys and values to every query head and attend over the whole square.
The rows' logits equal each prompt's own prefill, or a prefill of the whole prompts with nothing cached (a stated
tolerance: summation order may differ), with the same greedy token; under a dispatch mode (a profiler's)
nothing changes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from app.model.compute.attention import flash
from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator, Row
from app.model.runtime import LoadedModel
from app.types import SamplingParams

TOLERANCE = 1e-4
PROMPTS = [[1, *range(100, 137)], [1, *range(200, 209)], [1, *range(300, 322)]]


class _Attention(TorchFunctionMode):
    """Every scaled_dot_product_attention call's keyword arguments, with its mask and key heads."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append(
                {
                    "lower_right": mask is not None and _lower_right(mask, query.shape[2], key.shape[2]),
                    "causal": kwargs.get("is_causal", False),
                    "gqa": kwargs.get("enable_gqa", False),
                    "heads": (query.shape[1], key.shape[1]),
                }
            )
        return func(*args, **kwargs)


class _Passing(TorchDispatchMode):
    """A dispatch mode that only passes each op on (what profilers and counters wrap a forward in)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _lower_right(mask: torch.Tensor, queries: int, keys: int) -> bool:
    """Whether every row's boolean mask is causal aligned to the lower right of [queries, keys], and no more."""
    want = torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]
    return mask.dtype == torch.bool and bool((mask == want).all())


def _check(calls: list[dict[str, Any]], config: Any, cached: bool) -> None:
    """Every call: a cached prefix's mask (lower-right causal), or with none, SDPA's causal and no mask."""
    assert len(calls) == config.num_hidden_layers
    for call in calls:
        assert (call["lower_right"], call["causal"]) == ((True, False) if cached else (False, True)), call
        assert call["heads"] == (config.num_attention_heads, config.num_key_value_heads), call
        assert call["gqa"] is (config.num_key_value_heads < config.num_attention_heads), call


def _generator(loaded: LoadedModel, prefix_caching: bool) -> BatchGenerator:
    log_mel = LogMel(loaded.processor.feature_extractor, 3000)
    return BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel, prefix_caching=prefix_caching)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_fresh_prefill_of_prompts_of_different_lengths_is_causal_unmasked_and_grouped(
    loaded: LoadedModel, prefix_caching: bool
) -> None:
    generator = _generator(loaded, prefix_caching)
    rows = [Row(list(prompt), [], SamplingParams(temperature=0.0)) for prompt in PROMPTS]
    with _Attention() as seen:
        state, logits = generator.prefill(rows)
    _check(seen.calls, loaded.model.config.text_config, cached=False)
    generator.release(state)

    for i, prompt in enumerate(PROMPTS):
        alone = _generator(loaded, prefix_caching=False)
        one, own = alone.prefill([Row(list(prompt), [], SamplingParams(temperature=0.0))])
        torch.testing.assert_close(logits[i], own[0], atol=TOLERANCE, rtol=TOLERANCE)
        assert int(logits[i].argmax()) == int(own[0].argmax())
        alone.release(one)


def test_a_prefill_extending_a_cached_prefix_attends_lower_right_with_grouped_heads(loaded: LoadedModel) -> None:
    """Two prompts that share 32 cached tokens prefill only their tails (of 9 and 3 tokens, right-padded): every
    attention call of that pass takes a lower-right causal mask with the KV heads in place, also under a
    dispatch mode, and the rows' logits equal those of a prefill of the whole prompts with nothing cached."""
    generator = _generator(loaded, prefix_caching=True)
    shared = [1, *range(400, 440)]
    first, _ = generator.prefill([Row(list(shared), [], SamplingParams(temperature=0.0))])
    generator.select(first, [])  # the row leaves: its slot caches its tokens
    prompts = [shared + list(range(500, 509)), shared + list(range(600, 603))]
    rows = [Row(list(prompt), [], SamplingParams(temperature=0.0)) for prompt in prompts]
    with _Attention() as seen, _Passing():
        state, logits = generator.prefill(rows)
    assert [row.cached_tokens for row in rows] == [32, 32]
    _check(seen.calls, loaded.model.config.text_config, cached=True)
    generator.release(state)

    alone = _generator(loaded, prefix_caching=False)
    fresh, want = alone.prefill([Row(list(prompt), [], SamplingParams(temperature=0.0)) for prompt in prompts])
    torch.testing.assert_close(logits, want, atol=TOLERANCE, rtol=TOLERANCE)
    assert logits.argmax(-1).tolist() == want.argmax(-1).tolist()
    alone.release(fresh)


def test_the_flash_kernel_is_only_cudas() -> None:
    """On a CPU the flash branch declines (the CPU's SDPA takes the mask); on CUDA it is the kernel's to take."""
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    assert flash(q, k, k, None) is None
