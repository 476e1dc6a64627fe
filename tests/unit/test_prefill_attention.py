"""How a fresh prefill of several prompts calls attention (app/model/compute/generate.py): right-padded with no
mask, so every call is causal with no mask and its grouped-query heads read in place (`enable_gqa`), which is
what lets a GPU run its flash kernel there. A padding mask instead makes transformers expand the keys and
values to every query head and attend over the whole square (a GPU's memory-efficient kernel, no causal skip).
The rows' logits equal each prompt's own prefill (a stated tolerance: the kernels' summation order may
differ), with the same greedy token."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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
            self.calls.append(
                {
                    "mask": kwargs.get("attn_mask", args[3] if len(args) > 3 else None),
                    "causal": kwargs.get("is_causal", False),
                    "gqa": kwargs.get("enable_gqa", False),
                    "heads": (query.shape[1], key.shape[1]),
                }
            )
        return func(*args, **kwargs)


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
    config = loaded.model.config.text_config
    assert len(seen.calls) == config.num_hidden_layers
    for call in seen.calls:
        assert call["mask"] is None and call["causal"] is True, call
        assert call["heads"] == (config.num_attention_heads, config.num_key_value_heads), call
        assert call["gqa"] is (config.num_key_value_heads < config.num_attention_heads), call
    generator.release(state)

    for i, prompt in enumerate(PROMPTS):
        alone = _generator(loaded, prefix_caching=False)
        one, own = alone.prefill([Row(list(prompt), [], SamplingParams(temperature=0.0))])
        torch.testing.assert_close(logits[i], own[0], atol=TOLERANCE, rtol=TOLERANCE)
        assert int(logits[i].argmax()) == int(own[0].argmax())
        alone.release(one)


def test_a_prefill_extending_a_cached_prefix_attends_lower_right_with_grouped_heads(loaded: LoadedModel) -> None:
    """Two prompts that share 32 cached tokens prefill only their tails: every attention call of that pass takes
    torch's lower-right causal bias (no mask transformers would expand the keys for) with the KV heads in place,
    and the rows' logits equal those of a prefill of the whole prompts with nothing cached."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    generator = _generator(loaded, prefix_caching=True)
    shared = [1, *range(400, 440)]
    first, _ = generator.prefill([Row(list(shared), [], SamplingParams(temperature=0.0))])
    generator.select(first, [])  # the row leaves: its slot caches its tokens
    prompts = [shared + list(range(500, 509)), shared + list(range(600, 603))]
    rows = [Row(list(prompt), [], SamplingParams(temperature=0.0)) for prompt in prompts]
    with _Attention() as seen:
        state, logits = generator.prefill(rows)
    assert [row.cached_tokens for row in rows] == [32, 32]
    config = loaded.model.config.text_config
    assert len(seen.calls) == config.num_hidden_layers
    for call in seen.calls:
        assert isinstance(call["mask"], CausalBias) and call["mask"].variant == CausalVariant.LOWER_RIGHT, call
        assert call["heads"] == (config.num_attention_heads, config.num_key_value_heads), call
        assert call["gqa"] is (config.num_key_value_heads < config.num_attention_heads), call
    generator.release(state)

    alone = _generator(loaded, prefix_caching=False)
    fresh, want = alone.prefill([Row(list(prompt), [], SamplingParams(temperature=0.0)) for prompt in prompts])
    torch.testing.assert_close(logits, want, atol=TOLERANCE, rtol=TOLERANCE)
    assert logits.argmax(-1).tolist() == want.argmax(-1).tolist()
    alone.release(fresh)
