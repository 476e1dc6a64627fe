"""One decode step of the Mistral decoder in the ops it needs, over the slot cache: what a GPU captures and replays.

transformers' modules stay the loader, the prefill and the reference; a decode step instead runs here on
their weights. Per layer: one RMS norm, ONE projection for q, k and v (their weights concatenated once, the
modules' own weights becoming views of it, so no memory is doubled), rotary on q and k together from tables
built once a step, keys and values written in place at each row's position, attention over the first `rows`
slots up to `width` positions with a mask built once a step, the output projection, a second norm, ONE
projection for gate and up, and the down projection.

Every input is a tensor of a fixed shape for a given (rows, width): the step neither allocates by data nor
reads anything back, so CUDA can capture it once per shape (app/model/compute/graphs.py). The numbers are
those of transformers' eager modules up to summation order in the fused projections (the same products,
one matrix multiply instead of three or two).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.model.compute.slots import SlotCache


@dataclass(frozen=True)
class _Layer:
    norm_in: torch.Tensor
    qkv: torch.Tensor
    """[hidden, (heads + 2 kv_heads) x head_dim]: the transposed view of the fused weight."""
    out: torch.Tensor
    norm_post: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


_FUSED = "_voxtral_fused"
"""Where `fuse` leaves the fused weight on the first module, with the weights' addresses it made."""


def fuse(modules: list[torch.nn.Linear]) -> torch.Tensor:
    """One weight [sum of outputs, inputs] for `modules`, each module's weight then a view of its rows; where
    they already are (a second generator on the same model), that weight, not a copy."""
    done = getattr(modules[0], _FUSED, None)
    if done is not None and done[1] == [m.weight.data_ptr() for m in modules]:
        fused: torch.Tensor = done[0]
        return fused
    fused = torch.cat([m.weight.detach() for m in modules])
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight.data = fused[start : start + rows]
        start += rows
    setattr(modules[0], _FUSED, (fused, [m.weight.data_ptr() for m in modules]))
    return fused


class LeanDecoder:
    """Owns nothing but views of the model's weights."""

    def __init__(self, language_model: Any, lm_head: torch.nn.Linear) -> None:
        config = language_model.config
        if getattr(config, "sliding_window", None) is not None:
            raise ValueError("the lean decode step has no sliding window")
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.intermediate = int(config.intermediate_size)
        self.eps = float(config.rms_norm_eps)
        self.scaling = self.head_dim**-0.5
        self.embed = language_model.embed_tokens.weight
        self.norm = language_model.norm.weight
        self.inv_freq: torch.Tensor = language_model.rotary_emb.inv_freq
        self.rope_scaling = float(getattr(language_model.rotary_emb, "attention_scaling", 1.0))
        self.head = lm_head.weight
        device, dtype = self.embed.device, self.embed.dtype
        self.count = torch.tensor(float(config.hidden_size), device=device)
        self.eps_t = torch.tensor(self.eps, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.masked = torch.tensor(float("-inf"), dtype=dtype, device=device)
        self.layers = [self._layer(layer) for layer in language_model.layers[: config.num_hidden_layers]]

    def _layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        if str(getattr(mlp.act_fn, "__name__", type(mlp.act_fn).__name__)).lower() not in ("silu", "siluactivation"):
            raise ValueError("the lean decode step computes SiLU MLPs only")
        return _Layer(
            norm_in=layer.input_layernorm.weight,
            qkv=fuse([attn.q_proj, attn.k_proj, attn.v_proj]).t(),
            out=attn.o_proj.weight.t(),
            norm_post=layer.post_attention_layernorm.weight,
            gate_up=fuse([mlp.gate_proj, mlp.up_proj]).t(),
            down=mlp.down_proj.weight.t(),
        )

    def __call__(self, packed: torch.Tensor, width: int, cache: SlotCache) -> torch.Tensor:
        """Float32 logits [rows, vocab] in the order of `packed[3]`.

        `packed` [4, rows] int64 on the model's first device, in slot order (row j of the step is slot j):
        0 the token fed, 1 its position, 2 the slot it is written to (the scratch slot for padding),
        3 for each output row, the step row it is (the batch's own order; padding repeats any)."""
        ids, positions, writes, order = packed[0], packed[1], packed[2], packed[3]
        step = _Step(self, ids, positions, writes, cache.max_len, width)
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            keys, values = cache.keys[i], cache.values[i]
            if keys.device != x.device:  # a model spread over several devices
                x, step = x.to(keys.device), step.to(keys.device)
            x = x + self._attention(x, layer, keys, values, step)
            x = x + self._mlp(x, layer, step)
        x = x.index_select(0, order.to(x.device))
        return torch.mm(_rms(x, self.norm.to(x.device), step), self.head.t()).float()

    def _attention(
        self, x: torch.Tensor, layer: _Layer, keys: torch.Tensor, values: torch.Tensor, step: _Step
    ) -> torch.Tensor:
        rows, d, width = x.shape[0], self.head_dim, step.width
        qkv = torch.mm(_rms(x, layer.norm_in, step), layer.qkv)
        rotated = self.heads + self.kv_heads
        qk = qkv[:, : rotated * d].view(rows, rotated, d)
        # rotate_half(x) * sin == (x's halves swapped) * (sin with its first half negated), exactly
        swapped = qk.view(rows, rotated, 2, d // 2).flip(-2).view(rows, rotated, d)
        qk = qk * step.cos + swapped * step.sin
        keys.view(-1, d).index_put_((step.flat,), qk[:, self.heads :])
        values.view(-1, d).index_put_((step.flat,), qkv[:, rotated * d :].view(rows, self.kv_heads, d))
        # The query heads that share a KV head (consecutive, as transformers' repeat_kv pairs them) attend as that
        # head's queries: the same keys for each, so no GQA support is needed from any attention kernel.
        attended = F.scaled_dot_product_attention(
            qk[:, : self.heads].view(rows, self.kv_heads, self.heads // self.kv_heads, d),
            keys[:rows, :, :width],
            values[:rows, :, :width],
            attn_mask=step.mask,
            scale=self.scaling,
        )
        return torch.mm(attended.view(rows, self.heads * d), layer.out)

    def _mlp(self, x: torch.Tensor, layer: _Layer, step: _Step) -> torch.Tensor:
        gate_up = torch.mm(_rms(x, layer.norm_post, step), layer.gate_up)
        return torch.mm(F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :], layer.down)


class _Step:
    """What every layer of one step shares, built once: rotary tables, the additive mask, the cache index
    each row writes, and the norms' constants as 0-dim tensors (a Python number costs a conversion per op)."""

    def __init__(
        self,
        decoder: LeanDecoder,
        ids: torch.Tensor,
        positions: torch.Tensor,
        writes: torch.Tensor,
        max_len: int,
        width: int,
    ) -> None:
        dtype, device = decoder.embed.dtype, ids.device
        self.width = width
        heads = torch.arange(decoder.kv_heads, device=device)
        self.flat = (writes.unsqueeze(1) * decoder.kv_heads + heads) * max_len + positions.unsqueeze(1)
        """[rows, kv_heads]: where each row's key (value) of each head goes in a layer's cache viewed as
        [slots x kv_heads x max_len, head_dim] (one `index_put_` writes a row's heads at its position)."""
        freqs = positions.unsqueeze(1).float() * decoder.inv_freq.float()
        if decoder.rope_scaling != 1.0:
            freqs_cos, freqs_sin = freqs.cos() * decoder.rope_scaling, freqs.sin() * decoder.rope_scaling
        else:
            freqs_cos, freqs_sin = freqs.cos(), freqs.sin()
        self.cos = torch.cat((freqs_cos, freqs_cos), dim=-1).to(dtype).unsqueeze(1)
        self.sin = torch.cat((-freqs_sin, freqs_sin), dim=-1).to(dtype).unsqueeze(1)
        allowed = torch.arange(width, device=device) <= positions.unsqueeze(1)
        self.mask = torch.where(allowed, decoder.zero, decoder.masked).view(-1, 1, 1, width)
        self.count = decoder.count
        self.eps = decoder.eps_t

    def to(self, device: torch.device) -> _Step:
        moved = copy.copy(self)
        moved.flat, moved.cos, moved.sin, moved.mask = (
            t.to(device) for t in (self.flat, self.cos, self.sin, self.mask)
        )
        return moved


def _rms(x: torch.Tensor, weight: torch.Tensor, step: _Step) -> torch.Tensor:
    """transformers' MistralRMSNorm in float32 inside: its mean is a sum and a division on every device (the
    same numbers), and a float32 model skips the casts."""
    wide = x if x.dtype == torch.float32 else x.float()
    scale = torch.rsqrt(torch.addcdiv(step.eps, torch.sum(wide * wide, -1, keepdim=True), step.count))
    return weight * (wide * scale if x.dtype == torch.float32 else (wide * scale).to(x.dtype))
