"""Weight quantization of the language model's linear layers at load (`--quantization`, vLLM's flag).

Only the decoder's projections are quantized: the audio encoder (quantizing it hurts transcription), the
multi-modal projector and `lm_head` stay in the checkpoint's dtype, as do the embedding and the norms. The
formats are transformers' own quantizers, so a real checkpoint and `--model tiny` go through the same
`from_pretrained`: `int8` is torchao's weight-only int8 (per output row, CPU and GPU), `bitsandbytes` is 4-bit
NF4 (vLLM's meaning of the value; bitsandbytes has a CPU backend), `fp8` is torchao's float8 weights and
activations (CUDA of compute capability 8.9 or newer only). A checkpoint saved quantized (a
`quantization_config` in its config.json) loads as it is.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Quantization = Literal["none", "int8", "bitsandbytes", "fp8"]

KEPT = ("model.audio_tower", "model.multi_modal_projector", "lm_head")
"""Modules never quantized, by their full names (bitsandbytes matches skips from the name's start). Naming any
replaces transformers' default skips (the head among them), so every one is listed."""
FP8_CAPABILITY = (8, 9)
"""Float8 tensor cores: Ada (8.9) and Hopper (9.0) on."""


def load_config(quantization: Quantization, dtype: torch.dtype) -> Any | None:
    """transformers' `quantization_config` for `from_pretrained` (None: load unquantized)."""
    if quantization == "none":
        return None
    if quantization == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=list(KEPT),
        )
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow, PerTensor
    from transformers import TorchAoConfig

    if quantization == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=list(KEPT))
    granularity = PerRow() if dtype == torch.bfloat16 else PerTensor()  # torchao's row scales need bfloat16
    return TorchAoConfig(
        Float8DynamicActivationFloat8WeightConfig(granularity=granularity), modules_to_not_convert=list(KEPT)
    )


def saved_quantization(config: dict[str, Any]) -> str | None:
    """What a checkpoint's config.json says its weights are: one of our format names, another method's own
    name (e.g. awq, gptq), or None (not quantized)."""
    saved = config.get("quantization_config")
    if not isinstance(saved, dict):
        return None
    method = str(saved.get("quant_method", "unknown"))
    if method == "bitsandbytes":
        return "bitsandbytes" if saved.get("load_in_4bit") or saved.get("_load_in_4bit") else "bitsandbytes-8bit"
    if method == "torchao":
        kind = str(saved.get("quant_type", {}).get("default", {}).get("_type", ""))
        return {"Int8WeightOnlyConfig": "int8"}.get(kind, "fp8" if kind.startswith("Float8") else f"torchao {kind}")
    return method


def refusal(quantization: Quantization, saved: str | None, device: torch.device) -> str | None:
    """Why `quantization` cannot load here (one line saying what to do), or None."""
    if saved is not None and quantization not in ("none", saved):
        return (
            f"--quantization {quantization}: the checkpoint is already quantized ({saved}, its config.json's "
            "quantization_config) and loads as it is; drop --quantization or pass an unquantized checkpoint."
        )
    if quantization != "fp8" or saved is not None:
        return None
    where = "a CPU" if device.type != "cuda" else _gpu_name(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        return (
            f"--quantization fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); this is "
            f"{where}: use --quantization int8 (8-bit) or bitsandbytes (4-bit) instead."
        )
    return None


def _gpu_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def is_quantized(model: Any) -> bool:
    """Whether the loaded model's linear weights are quantized tensors (at load, or as saved)."""
    return getattr(model.config, "quantization_config", None) is not None


def keep_compute_dtype(model: Any, dtype: torch.dtype) -> int:
    """Make bitsandbytes' NF4 layers compute in `dtype` on a CPU; return how many were changed. On a CPU with
    AVX-512 BF16, `Linear4bit` otherwise repacks its weight at the first forward for a fused kernel that rounds
    the activations to bfloat16 whatever the compute dtype: a float32 model would silently compute in
    bfloat16. Where `dtype` is bfloat16 that kernel is kept (it computes what was asked)."""
    if dtype == torch.bfloat16:
        return 0
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
