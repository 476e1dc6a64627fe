"""The reference a realtime stream is held to: transformers' own `generate` over the same audio, fed through an
`input_features` generator as transformers documents streaming (docs/source/en/model_doc/voxtral_realtime.md):
the prompt's log-mel (left pad + the first chunk, centred STFT), then one 1,680-sample window a token
(uncentred), after the audio is right-padded as mistral-common pads a streaming transcription.

That mode, not generate over the whole features at once, is the reference for streaming: it is the one that
computes what a live stream can (the convolutions continue through transformers' padding cache, the log-mel is
taken window by window, generation ends when the audio does), where the offline mode convolves and
featurises the whole padded file in one go and sets the length from it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

SAMPLES_PER_TOKEN = 1280
LEFT_PAD_TOKENS = 32
RIGHT_PAD_EXTRA = 10


def right_padded(audio: np.ndarray, delay: int) -> np.ndarray:
    """mistral-common's streaming right pad: to a whole token-frame, then delay + 1 + 10 frames of silence."""
    pad = (SAMPLES_PER_TOKEN - len(audio) % SAMPLES_PER_TOKEN) % SAMPLES_PER_TOKEN
    pad += (delay + 1 + RIGHT_PAD_EXTRA) * SAMPLES_PER_TOKEN
    return np.pad(audio.astype(np.float32), (0, pad))


def prompt(processor: Any, audio: np.ndarray, delay: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first forward's input ids and log-mel, as VoxtralRealtimeProcessor(is_streaming=True,
    is_first_audio_chunk=True) builds them for `delay` tokens."""
    extractor = processor.feature_extractor
    first = ((delay + 1) * 8 - 1) * extractor.hop_length + extractor.win_length // 2
    encoder = processor.tokenizer.tokenizer.instruct_tokenizer.audio_encoder
    ids = torch.tensor([[1] + [encoder.streaming_pad] * (LEFT_PAD_TOKENS + delay)])
    left = np.zeros(LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN, dtype=np.float32)
    features = extractor(np.concatenate([left, audio[:first]]), sampling_rate=16000, return_tensors="pt")
    return ids, features.input_features


def windows(processor: Any, audio: np.ndarray, delay: int) -> Iterator[torch.Tensor]:
    """Each later token's log-mel window, transformers' streaming loop with its `num_samples_per_audio_chunk`."""
    extractor = processor.feature_extractor
    hop, win = extractor.hop_length, extractor.win_length
    mel = (delay + 1) * 8
    start = mel * hop - win // 2
    while (end := start + 8 * hop + win) < audio.shape[0]:
        yield extractor(audio[start:end], center=False, sampling_rate=16000, return_tensors="pt").input_features
        mel += 8
        start = mel * hop - win // 2


def reference_tokens(model: Any, processor: Any, audio: np.ndarray, delay: int) -> list[int]:
    """Greedy tokens of `generate` streaming `audio` (then the right pad) with `delay` delay tokens."""
    padded_audio = right_padded(audio, delay)
    ids, first = prompt(processor, padded_audio, delay)

    def features() -> Iterator[torch.Tensor]:
        yield first
        yield from windows(processor, padded_audio, delay)

    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, input_features=features(), num_delay_tokens=delay, do_sample=False, eos_token_id=None
        )
    return [int(t) for t in out[0, ids.shape[1] :]]


def synthetic(seconds: float, seed: int) -> np.ndarray:
    """Noise under a few tones that change every half second: float32 mono 16 kHz."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    freq = rng.uniform(100, 3000, size=n // 8000 + 1)[np.arange(n) // 8000]
    tone = 0.3 * np.sin(2 * np.pi * freq * t)
    return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)
