"""Build a tiny, randomly initialised Voxtral checkpoint offline.

Tests and the demo server need a model that goes through exactly the code a real
checkpoint does (the same classes, processor and tokenizer file format) without
network access or gigabytes of weights. The recipe (dimensions, token ranks, the
larger init std) was measured against transformers 5.24 / mistral-common 1.13.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TINY_MARKER = "voxtral_server_tiny.json"
"""A file written beside the weights so the server can say loudly that they are random."""

NUM_SPECIAL = 1000
NUM_VOCAB = 2000
"""Regular tokens of the fast default test model: 3,000 ids in all."""
FULL_VOCAB = 131_072 - NUM_SPECIAL
"""Regular tokens of the real Voxtral checkpoints' tekken (131,072 ids in all): the size at which per-token
work (sampling, grammar masks, detokenizing) costs what it costs in production."""
AUDIO_TOKEN_ID = 24

# mistral-common's fixed names at ranks 0-19, then the audio/tool markers Voxtral needs.
_FIXED_SPECIALS: dict[int, str] = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    24: "[AUDIO]",
    25: "[BEGIN_AUDIO]",
    32: "[ARGS]",
    33: "[CALL_ID]",
    34: "[TRANSCRIBE]",
}


def build_tekken(version: str = "v11", num_vocab: int = NUM_VOCAB) -> dict[str, Any]:
    """A tekken.json derived from the one mistral-common ships (its first `num_vocab` tokens), with an
    audio section. Small by default; the GPU bench's Mini-sized model takes all 130,072."""
    source = resources.files("mistral_common") / "data" / "tekken_240911.json"
    base = json.loads(source.read_text(encoding="utf-8"))
    specials = [
        {"rank": r, "token_str": _FIXED_SPECIALS.get(r, f"<SPECIAL_{r}>"), "is_control": True}
        for r in range(NUM_SPECIAL)
    ]
    config = dict(base["config"])
    config.update(
        num_vocab_tokens=num_vocab,
        default_vocab_size=num_vocab + NUM_SPECIAL,
        default_num_special_tokens=NUM_SPECIAL,
        version=version,
    )
    return {
        "config": config,
        "vocab": base["vocab"][:num_vocab],
        "special_tokens": specials,
        "audio": {
            "sampling_rate": 16000,
            "frame_rate": 12.5,
            "chunk_length_s": 30.0,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
        },
    }


def save_processor(out: Path, tokenizer_version: str = "v11", num_vocab: int = NUM_VOCAB) -> Any:
    """Write tekken.json and Voxtral's processor files (Whisper features, 128 mels) to `out`; return
    the tokenizer."""
    from transformers import (  # type: ignore[attr-defined]
        MistralCommonBackend,
        VoxtralProcessor,
        WhisperFeatureExtractor,
    )

    out.mkdir(parents=True, exist_ok=True)
    (out / "tekken.json").write_text(json.dumps(build_tekken(tokenizer_version, num_vocab)), encoding="utf-8")
    tokenizer = MistralCommonBackend(tokenizer_path=str(out / "tekken.json"))
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=30
    )
    VoxtralProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    tokenizer_version: str = "v11",
    full_vocab: bool = False,
    text_layers: int = 2,
) -> Path:
    """Write a complete random Voxtral checkpoint (weights, processor, tokenizer) to `out_dir`.
    `full_vocab`: the real 131,072-token vocabulary instead of 3,000 ids (the model stays tiny otherwise);
    `text_layers`: decoder layers (30 is Mini's depth: at tiny widths a step then costs what it dispatches)."""
    import torch
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration

    out = Path(out_dir)
    tokenizer = save_processor(out, tokenizer_version, FULL_VOCAB if full_vocab else NUM_VOCAB)

    config = VoxtralConfig(
        audio_config={
            "model_type": "voxtral_encoder",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_mel_bins": 128,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 32768,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 11,
        },
        audio_token_id=AUDIO_TOKEN_ID,
    )
    torch.manual_seed(seed)
    model = VoxtralForConditionalGeneration(config)
    with torch.no_grad():
        # std 0.02 makes greedy output nearly independent of the input: parity tests would be blind.
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed_positions" not in name:
                param.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 11
    model.save_pretrained(out)
    marker = {"seed": seed, "random_weights": True, "vocab_size": len(tokenizer)}
    (out / TINY_MARKER).write_text(json.dumps(marker), encoding="utf-8")
    log.info("built tiny random Voxtral in %s", out)
    return out


def is_tiny(path: str | Path) -> bool:
    return (Path(path) / TINY_MARKER).exists()


REALTIME_SPECIALS: dict[int, str] = {35: "[STREAMING_PAD]", 36: "[STREAMING_WORD]"}
"""Voxtral Realtime's stream markers (mistral-common's names), at ranks the tiny tekken leaves free."""
REALTIME_AUDIO: dict[str, Any] = {
    "sampling_rate": 16000,
    "frame_rate": 12.5,
    "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    "transcription_format": "streaming",
    "transcription_delay_ms": 480,
    "streaming_look_ahead_ms": 2.5,
    "streaming_look_back_ms": 52.5,
    "streaming_n_left_pad_tokens": 32,
}
"""Voxtral-Mini-4B-Realtime-2602's tekken audio section: one token per 80 ms at 16 kHz, 480 ms default delay,
32 left-pad tokens (mistral-common's `AudioConfig` streaming fields)."""
REALTIME_ENCODER_WINDOW = 24
"""The tiny encoder's sliding window in encoder frames (4 a token: ~0.5 s; the real one: 750, 15 s)."""
REALTIME_DECODER_WINDOW = 48
"""The tiny decoder's sliding window in tokens (~3.8 s; the real one: 8,192, ~11 min): small so that a
10-minute test stream wraps both windows many times."""


def build_realtime_tekken(num_vocab: int = NUM_VOCAB) -> dict[str, Any]:
    """The tiny tekken.json with Voxtral Realtime's stream markers and streaming audio section."""
    tekken = build_tekken("v11", num_vocab)
    for special in tekken["special_tokens"]:
        special["token_str"] = REALTIME_SPECIALS.get(special["rank"], special["token_str"])
    tekken["audio"] = dict(REALTIME_AUDIO)
    return tekken


def build_tiny_realtime_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete random Voxtral Realtime checkpoint (weights, VoxtralRealtimeProcessor, a tekken with
    the streaming audio settings) to `out_dir`; small sliding windows, the real model's per-token arithmetic
    (8 mel frames -> 4 encoder frames -> 1 token, 6 delay tokens by default)."""
    import torch
    from transformers import (  # type: ignore[attr-defined]
        MistralCommonBackend,
        VoxtralRealtimeConfig,
        VoxtralRealtimeFeatureExtractor,
        VoxtralRealtimeForConditionalGeneration,
        VoxtralRealtimeProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tekken.json").write_text(json.dumps(build_realtime_tekken()), encoding="utf-8")
    tokenizer = MistralCommonBackend(tokenizer_path=str(out / "tekken.json"))
    VoxtralRealtimeProcessor(feature_extractor=VoxtralRealtimeFeatureExtractor(), tokenizer=tokenizer).save_pretrained(
        out
    )
    config = VoxtralRealtimeConfig(
        audio_config={
            "model_type": "voxtral_realtime_encoder",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "head_dim": 16,
            "num_mel_bins": 128,
            "sliding_window": REALTIME_ENCODER_WINDOW,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": REALTIME_DECODER_WINDOW,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 11,
        },
    )
    torch.manual_seed(seed)
    model = VoxtralRealtimeForConditionalGeneration(config)
    with torch.no_grad():  # as build_tiny_model: a larger std so that greedy tokens depend on the audio
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 11
    model.save_pretrained(out)
    marker = {"seed": seed, "random_weights": True, "vocab_size": len(tokenizer), "realtime": True}
    (out / TINY_MARKER).write_text(json.dumps(marker), encoding="utf-8")
    log.info("built tiny random Voxtral Realtime in %s", out)
    return out
