"""Weight bytes of a Voxtral model by part (encoder, projector, decoder, embedding, head), as loaded or as a
config would be in each weight format.

Two answers from one part map: `loaded_bytes` counts what the loaded model's tensors hold (quantized tensors'
data and their scales, zero points and block statistics), logged at start-up and read by bench/quant.py;
`format_bytes` computes what a config's model would hold in a format, from the shapes of a model built on the
meta device (no memory, no weights), for the README's table. Both count each shared tensor once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

Format = Literal["bf16", "int8", "fp8", "nf4"]
FORMATS: tuple[Format, ...] = ("bf16", "int8", "fp8", "nf4")

_PARTS = (
    ("model.audio_tower.", "encoder"),
    ("model.multi_modal_projector.", "projector"),
    ("model.language_model.embed_tokens.", "embedding"),
    ("model.language_model.", "decoder"),
    ("lm_head.", "head"),
)
NF4_BLOCK = 64
"""Weights per NF4 absmax (bitsandbytes' default blocksize): one float32 statistic each, double quantization off
(transformers' default), and a 16-entry float32 code table per tensor."""


@dataclass(frozen=True)
class PartBytes:
    encoder: int = 0
    projector: int = 0
    decoder: int = 0
    embedding: int = 0
    head: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        """One log line: every part and the total, in MiB."""
        parts = ", ".join(f"{f.name} {getattr(self, f.name) / 2**20:.1f}" for f in fields(self))
        return f"{parts}; total {self.total / 2**20:.1f} MiB"


def part_of(name: str) -> str:
    """The part a parameter (by its full name in VoxtralForConditionalGeneration) belongs to."""
    for prefix, part in _PARTS:
        if name.startswith(prefix):
            return part
    raise ValueError(f"{name!r} is in no part of a Voxtral model")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) weight holds: a bitsandbytes `Params4bit`'s packed data and quant state,
    a torchao tensor subclass's inner tensors (data, scales, zero points), else its elements."""
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        return _plain(tensor) + _state_bytes(state)
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in names)
        return sum(tensor_bytes(t) for t in inner if isinstance(t, torch.Tensor))
    return _plain(tensor)


def _plain(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _state_bytes(state: Any) -> int:
    """A bitsandbytes QuantState: its absmax and code (and, double-quantized, the absmax's own state)."""
    total = sum(_plain(t) for t in (state.absmax, state.code) if t is not None)
    if getattr(state, "nested", False):
        total += _state_bytes(state.state2) + (_plain(state.offset) if state.offset is not None else 0)
    return total


def loaded_bytes(model: Any) -> PartBytes:
    """Bytes of the loaded model's weights by part (each shared weight once)."""
    counts = {f.name: 0 for f in fields(PartBytes)}
    for name, param in model.named_parameters():
        counts[part_of(name)] += tensor_bytes(param)
    return PartBytes(**counts)


def format_bytes(config: Any, fmt: Format, itemsize: int = 2) -> PartBytes:
    """Bytes of `config`'s model in `fmt`: every weight in `itemsize` bytes (bfloat16's 2) but the decoder's
    linear layers, which
    `fmt` stores (int8: a byte a weight, a float32 scale and an int8 zero point per output row, torchao's
    layout; fp8: a byte a weight and a float32 scale per row; nf4: half a byte a weight, a float32 absmax per
    `NF4_BLOCK` weights, 64 bytes of code table per matrix). Pure: the shapes come from a meta-device model."""
    from transformers import VoxtralForConditionalGeneration

    with torch.device("meta"):
        model = VoxtralForConditionalGeneration(config)
    counts = {f.name: 0 for f in fields(PartBytes)}
    quantized = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and part_of(name + ".") == "decoder"
    }
    for name, param in model.named_parameters():
        rows = param.shape[0]
        counts[part_of(name)] += _format_weight(param.numel(), rows, fmt if name in quantized else "bf16", itemsize)
    return PartBytes(**counts)


def _format_weight(numel: int, rows: int, fmt: Format, itemsize: int) -> int:
    if fmt == "int8":
        return numel + rows * (4 + 1)
    if fmt == "fp8":
        return numel + rows * 4
    if fmt == "nf4":
        return math.ceil(numel / 2) + 4 * math.ceil(numel / NF4_BLOCK) + 16 * 4
    return itemsize * numel


def params_by_part(config: Any) -> PartBytes:
    """Parameters (not bytes) by part, with the decoder's linear layers alone under `decoder`."""
    from transformers import VoxtralForConditionalGeneration

    with torch.device("meta"):
        model = VoxtralForConditionalGeneration(config)
    counts = {f.name: 0 for f in fields(PartBytes)}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            part = part_of(f"{name}.{pname}")
            if part != "decoder" or isinstance(module, torch.nn.Linear):
                counts[part] += param.numel()
    return PartBytes(**counts)


def memory_table(configs: dict[str, Any]) -> str:
    """The README's table: each named config's weights in GB (10^9 bytes) per format, by part."""
    rows = ["| model | format | audio encoder | projector | decoder | embedding | head | total |"]
    rows.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, config in configs.items():
        for fmt in FORMATS:
            b = format_bytes(config, fmt)
            cells = [b.encoder, b.projector, b.decoder, b.embedding, b.head, b.total]
            rows.append(f"| {label} | {fmt} | " + " | ".join(f"{c / 1e9:.2f}" for c in cells) + " |")
    return "\n".join(rows)


def voxtral_configs() -> dict[str, Any]:
    """Voxtral Mini 3B and Small 24B (2507) as their config.json give them: VoxtralConfig's defaults are Mini's
    (a Whisper-large-v3 audio encoder, a 3B Llama-type decoder); Small's decoder is Mistral Small 3.1's."""
    from transformers import VoxtralConfig

    text = {"model_type": "llama", "vocab_size": 131_072}
    small = {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 32768}
    small |= {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
    return {
        "Voxtral Mini": VoxtralConfig(text_config=text),
        "Voxtral Small": VoxtralConfig(text_config=text | small),
    }
