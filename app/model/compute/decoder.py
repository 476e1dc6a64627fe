"""One decode step of the Mistral decoder in the ops it needs, over the slot cache: what a GPU captures and replays.

transformers' modules stay the loader, the prefill and the reference; a decode step instead runs here on
their weights. Per layer: one RMS norm, ONE projection for q, k and v (their weights concatenated once, the
modules' own weights becoming views of it, so no memory is doubled), rotary on q and k together from tables
built once a step, keys and values written in place at each row's position (one write), attention over the
first `rows` slots up to `width` positions with a mask built once a step, the output projection, a second
norm, ONE projection for gate and up, and the down projection.

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
import torch.distributed as dist
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


def forget_fused(model: torch.nn.Module) -> None:
    """Drop what `fuse` left on `model`'s modules: a copy of a fused model whose linear layers are then
    quantized in place would otherwise keep every fused weight alive beside the quantized ones."""
    for module in model.modules():
        module.__dict__.pop(_FUSED, None)


def fuse(modules: list[torch.nn.Linear]) -> torch.Tensor:
    """One weight [sum of outputs, inputs] for `modules`, each module's weight then a view of its rows; where
    they already are (a second generator on the same model), that weight, not a copy."""
    done = getattr(modules[0], _FUSED, None)
    if done is not None and done[1] == [_held(m.weight).data_ptr() for m in modules]:
        fused: torch.Tensor = done[0]
        return fused
    fused = torch.cat([_held(m.weight).detach() for m in modules])
    start = 0
    for module in modules:
        rows = _held(module.weight).shape[0]
        _held(module.weight).data = fused[start : start + rows]
        start += rows
    setattr(modules[0], _FUSED, (fused, [_held(m.weight).data_ptr() for m in modules]))
    return fused


def _held(weight: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds of `weight`: itself, or a tensor-parallel DTensor's local shard (the object
    the DTensor keeps, so rebinding its `.data` rebinds the shard the module's forward uses)."""
    local: torch.Tensor = getattr(weight, "_local_tensor", weight)
    return local


class LeanDecoder:
    """Owns nothing but views of the model's weights."""

    def __init__(self, language_model: Any, lm_head: torch.nn.Linear, group: Any = None) -> None:
        """`group`: the tensor-parallel process group when the decoder is sharded (transformers' `tp_plan`: this
        rank holds 1/size of the heads, of the MLP's width and of the vocabulary's embedding rows); None: one
        process, no collective."""
        config = language_model.config
        self.group = group
        ranks = 1 if group is None else int(group.size())
        if getattr(config, "sliding_window", None) is not None:
            raise ValueError("the lean decode step has no sliding window")
        self.heads = int(config.num_attention_heads) // ranks
        self.kv_heads = int(config.num_key_value_heads) // ranks
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.intermediate = int(config.intermediate_size) // ranks
        self.eps = float(config.rms_norm_eps)
        self.scaling = self.head_dim**-0.5
        self.embed = _held(language_model.embed_tokens.weight)
        self.vocab_start = 0 if group is None else -(-int(config.vocab_size) // ranks) * int(group.rank())
        """The first embedding row this rank holds (a DTensor's Shard(0) splits as torch.chunk does)."""
        self.norm = language_model.norm.weight
        self.inv_freq: torch.Tensor = language_model.rotary_emb.inv_freq.to(self.embed.device)
        """On the embedding's device: transformers' rotary moves it per call; the step reads it as it is."""
        self.rope_scaling = float(getattr(language_model.rotary_emb, "attention_scaling", 1.0))
        self.head = lm_head.weight
        self.head_module: torch.nn.Module | None = None if _plain(lm_head.weight) else lm_head
        """The head's own module where its weight is quantized (a checkpoint saved with a quantized head): its
        format's kernel computes it; a plain weight is one matmul into the step's logits."""
        self.vocab = int(lm_head.out_features)
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
            out=_held(attn.o_proj.weight).t(),
            norm_post=layer.post_attention_layernorm.weight,
            gate_up=fuse([mlp.gate_proj, mlp.up_proj]).t(),
            down=_held(mlp.down_proj.weight).t(),
        )

    def __call__(
        self, packed: torch.Tensor, width: int, cache: SlotCache, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits [rows, vocab] in the order of `packed[3]`: a new tensor, or `out` ([rows, vocab]
        float32, written in place: what every captured graph shares, app/model/compute/graphs.py).

        `packed` [4, rows] int64 on the model's first device, in slot order (row j of the step is slot j):
        0 the token fed, 1 its position, 2 the slot it is written to (the scratch slot for padding),
        3 for each output row, the step row it is (the batch's own order; padding repeats any)."""
        ids, positions, writes, order = packed[0], packed[1], packed[2], packed[3]
        step = _Step(self, ids, positions, writes, cache.max_len, width)
        x = self._embedding(ids)
        for i, layer in enumerate(self.layers):
            kv = cache.kv[i]
            if kv.device != x.device:  # a model spread over several devices
                x, step = x.to(kv.device), step.to(kv.device)
            x = x + self._attention(x, layer, kv, step)
            x = x + self._mlp(x, layer, step)
        x = _rms(x.index_select(0, order.to(x.device)), self.norm.to(x.device), step)
        if self.head_module is not None:
            logits: torch.Tensor = self.head_module(x)
            return logits.float() if out is None else out.copy_(logits)
        if out is None:
            return torch.mm(x, self.head.t()).float()
        if x.dtype == out.dtype:
            return torch.mm(x, self.head.t(), out=out)
        return out.copy_(torch.mm(x, self.head.t()))

    def _attention(self, x: torch.Tensor, layer: _Layer, kv: torch.Tensor, step: _Step) -> torch.Tensor:
        """`kv`: the layer's cache buffer, [slots + 1, 2 x kv_heads, max_len, head_dim] (keys' heads, then values')."""
        rows, d, width, kvh = x.shape[0], self.head_dim, step.width, self.kv_heads
        heads = self.heads + 2 * kvh
        qkv = self._qkv(_rms(x, layer.norm_in, step), layer).view(rows, heads, d)
        # rotate_half(x) * sin == (x's halves swapped) * (sin with its first half negated), exactly; the values'
        # heads take cos 1 and sin 0 (themselves, exactly), so q, k and v come out as one tensor whose last
        # 2 x kv_heads heads are the row's keys and values, written with ONE index_put_.
        swapped = qkv.view(rows, heads, 2, d // 2).flip(-2).view(rows, heads, d)
        qkv = qkv * step.cos + swapped * step.sin
        kv.view(-1, d).index_put_((step.flat,), qkv[:, self.heads :])
        # The query heads that share a KV head (consecutive, as transformers' repeat_kv pairs them) attend as that
        # head's queries: the same keys for each, so no GQA support is needed from any attention kernel.
        attended = F.scaled_dot_product_attention(
            qkv[:, : self.heads].view(rows, kvh, self.heads // kvh, d),
            kv[:rows, :kvh, :width],
            kv[:rows, kvh:, :width],
            attn_mask=step.mask,
            scale=self.scaling,
        )
        # CUDA's memory-efficient kernel (the one that takes a mask) returns a transposed, non-contiguous
        # output: reshape copies it there, and is a view of the CPU kernel's contiguous one.
        return self._reduce(self._out(attended.reshape(rows, self.heads * d), layer))

    def _qkv(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        return torch.mm(x, layer.qkv)

    def _out(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        return torch.mm(x, layer.out)

    def _mlp(self, x: torch.Tensor, layer: _Layer, step: _Step) -> torch.Tensor:
        gate_up = torch.mm(_rms(x, layer.norm_post, step), layer.gate_up)
        down = torch.mm(F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :], layer.down)
        return self._reduce(down)

    # -- tensor parallelism: the only places ranks meet (none in one process) -------------------------
    def _embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Each row's embedding; sharded, each rank looks up the ids in its rows (zeros for the rest), summed."""
        if self.group is None:
            return F.embedding(ids, self.embed)
        local = ids - self.vocab_start
        held = (local >= 0) & (local < self.embed.shape[0])
        x = F.embedding(local.clamp(0, self.embed.shape[0] - 1), self.embed) * held.unsqueeze(1).to(self.embed.dtype)
        return self._reduce(x)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a row-sharded projection's partial output (the o_proj, down_proj and embedding
        reductions transformers' hooks make in the prefill); itself in one process."""
        if self.group is not None:
            dist.all_reduce(partial, group=self.group)
        return partial


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
        kv = 2 * decoder.kv_heads
        self.flat = (writes.unsqueeze(1) * kv + torch.arange(kv, device=device)) * max_len + positions.unsqueeze(1)
        """[rows, 2 x kv_heads]: where each row's keys then values go in a layer's cache buffer viewed as
        [slots x 2 kv_heads x max_len, head_dim] (one `index_put_` writes a row's heads at its position)."""
        freqs = positions.unsqueeze(1).float() * decoder.inv_freq.float()
        if decoder.rope_scaling != 1.0:
            freqs_cos, freqs_sin = freqs.cos() * decoder.rope_scaling, freqs.sin() * decoder.rope_scaling
        else:
            freqs_cos, freqs_sin = freqs.cos(), freqs.sin()
        rotated, rows = decoder.heads + decoder.kv_heads, ids.shape[0]
        cos = torch.cat((freqs_cos, freqs_cos), dim=-1).to(dtype).unsqueeze(1).expand(rows, rotated, -1)
        sin = torch.cat((-freqs_sin, freqs_sin), dim=-1).to(dtype).unsqueeze(1).expand(rows, rotated, -1)
        kept = (rows, decoder.kv_heads, cos.shape[-1])  # the values' heads: cos 1, sin 0
        self.cos = torch.cat((cos, torch.ones(kept, dtype=dtype, device=device)), dim=1)
        self.sin = torch.cat((sin, torch.zeros(kept, dtype=dtype, device=device)), dim=1)
        """[rows, heads + 2 x kv_heads, head_dim]: each head's rotary factors, the identity for the values."""
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


@dataclass(frozen=True)
class _ModuleLayer(_Layer):
    """A quantized layer: its projections are its own modules (a quantized weight can be neither concatenated
    nor transposed into a GEMM operand); the inherited weight fields are empty."""

    q: torch.nn.Module
    k: torch.nn.Module
    v: torch.nn.Module
    o: torch.nn.Module
    gate: torch.nn.Module
    up: torch.nn.Module
    down_proj: torch.nn.Module


_EMPTY = torch.empty(0)


class ModuleDecoder(LeanDecoder):
    """The lean step over quantized linear layers (torchao tensor subclasses, bitsandbytes `Linear4bit`): each
    projection runs through its module's own forward (its format's kernel), q, k and v concatenated after
    their projections; the rest (norms, rotary, cache writes, attention, the head) is `LeanDecoder`'s. Nothing
    is fused, so the modules keep their weights untouched."""

    def _layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        if str(getattr(mlp.act_fn, "__name__", type(mlp.act_fn).__name__)).lower() not in ("silu", "siluactivation"):
            raise ValueError("the lean decode step computes SiLU MLPs only")
        return _ModuleLayer(
            layer.input_layernorm.weight, _EMPTY, _EMPTY, layer.post_attention_layernorm.weight, _EMPTY, _EMPTY,
            q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
            gate=mlp.gate_proj, up=mlp.up_proj, down_proj=mlp.down_proj,
        )  # fmt: skip

    def _qkv(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        assert isinstance(layer, _ModuleLayer)
        return torch.cat((layer.q(x), layer.k(x), layer.v(x)), dim=-1)

    def _out(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        assert isinstance(layer, _ModuleLayer)
        out: torch.Tensor = layer.o(x)
        return out

    def _mlp(self, x: torch.Tensor, layer: _Layer, step: _Step) -> torch.Tensor:
        assert isinstance(layer, _ModuleLayer)
        h = _rms(x, layer.norm_post, step)
        out: torch.Tensor = layer.down_proj(F.silu(layer.gate(h)) * layer.up(h))
        return out


def decoder_for(model: Any, group: Any = None) -> LeanDecoder:
    """The decode step of a loaded VoxtralForConditionalGeneration: `ModuleDecoder` where any of its decoder's
    linear layers holds a quantized weight (a bitsandbytes module, a torchao tensor subclass: however it was
    quantized, at load, as saved or in place), else `LeanDecoder` (sharded over `group` under tensor
    parallelism). Quantized and sharded together is refused: the modules' own forward would all-reduce too."""
    language_model, head = model.model.language_model, model.lm_head
    linears = (m for layer in language_model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    if all(type(m) is torch.nn.Linear and _plain(m.weight) for m in linears):
        return LeanDecoder(language_model, head, group)
    if group is not None:
        raise ValueError("a quantized decoder cannot be sharded: --quantization excludes --tensor-parallel-size > 1")
    return ModuleDecoder(language_model, head)


def _plain(weight: torch.Tensor) -> bool:
    """A weight the lean step can fuse: a parameter, or the DTensor shard transformers' tensor-parallel plan
    leaves (its local tensor is plain); a quantized tensor subclass is neither."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        return _plain(weight.to_local())
    return type(weight) in (torch.nn.Parameter, torch.Tensor)
