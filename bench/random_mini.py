"""A randomly initialised Voxtral with Voxtral-Mini-3B-2507's dimensions, for GPU benchmarks.

The engine issue asks for GPU figures without weights to download: the real shapes (a
Whisper-large-v3-sized audio encoder, a 3B Llama-type decoder, a 131,072-token vocabulary) make
every kernel cost what it costs with the real weights, whatever their values. It is built on the
GPU in bfloat16 and saved like any checkpoint, so the server loads it through the same code as a
real one. Its tokenizer is the tiny model's tekken file with the whole vocabulary, so every id the
random model emits decodes.

    python bench/random_mini.py /tmp/voxtral-mini-random --device cuda
    python bench/random_mini.py /tmp/mini-smoke --device cpu --layers 1   # a CPU smoke test (3 GB)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.model.tiny import AUDIO_TOKEN_ID, NUM_SPECIAL, save_processor  # noqa: E402

VOCAB = 131_072
"""Voxtral Mini's vocabulary; VoxtralConfig's defaults are Voxtral Mini's other dimensions."""


def model(
    out: Path,
    device: str,
    dtype: torch.dtype,
    layers: int | None = None,
    seed: int = 0,
    text: dict[str, Any] | None = None,
    audio: dict[str, Any] | None = None,
) -> Any:
    """The random model in memory, in eval mode, with its processor (and config) saved in `out` for
    `AutoProcessor.from_pretrained`. `layers`: fewer layers in both towers (the real widths); `text`, `audio`:
    other config values (bench/gpu_check.py's CPU smoke test shrinks the widths too)."""
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration

    tokenizer = save_processor(out, num_vocab=VOCAB - NUM_SPECIAL)
    text_config: dict[str, Any] = {"model_type": "llama", "vocab_size": len(tokenizer), "bos_token_id": 1}
    text_config |= {"eos_token_id": 2, "pad_token_id": 11}
    audio_config: dict[str, Any] = {"model_type": "voxtral_encoder"}
    if layers is not None:
        text_config["num_hidden_layers"] = audio_config["num_hidden_layers"] = layers
    text_config |= text or {}
    audio_config |= audio or {}
    config = VoxtralConfig(audio_config=audio_config, text_config=text_config, audio_token_id=AUDIO_TOKEN_ID)
    config.save_pretrained(out)
    torch.manual_seed(seed)
    with torch.device(device):
        built = VoxtralForConditionalGeneration(config).to(dtype).eval()
    built.generation_config.eos_token_id = 2
    built.generation_config.pad_token_id = 11
    return built


def build(out: Path, device: str, dtype: torch.dtype, layers: int | None = None, seed: int = 0) -> Path:
    """The random model saved as a checkpoint in `out`, processor included."""
    model(out, device, dtype, layers, seed).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (both towers), for smoke tests")
    args = parser.parse_args()
    started = time.perf_counter()
    build(args.out, args.device, getattr(torch, args.dtype), args.layers)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**30
    print(f"built {args.out} ({size:.1f} GiB) in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
