"""Conversation -> token ids + mel features, exactly as Voxtral's reference usage builds them.

Prompts go through mistral-common (the library Voxtral's processor uses) so that tools and
tool-result turns are rendered, which `VoxtralProcessor.apply_chat_template` silently drops.
The features are computed like the processor does: every audio padded to a multiple of 30 s
and cut into 3000-frame windows. Runs on CPU threads before the queue, never on the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.audio import SAMPLE_RATE, encode_wav_float32
from app.errors import InvalidRequest, UnsupportedFeature

CHUNK_SAMPLES = 30 * SAMPLE_RATE
TRANSLATE_INSTRUCTION = "Translate this audio into English. Answer with the translation only."


@dataclass
class Encoded:
    input_ids: list[int]
    input_features: torch.Tensor | None
    audio_seconds: float


class Prompter:
    """Owns the tokenizer and feature extractor of one checkpoint."""

    def __init__(self, processor: Any, model_id: str, mel_frames_per_chunk: int = 3000) -> None:
        self.processor = processor
        self.model_id = model_id
        self.mistral = processor.tokenizer.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.mel_frames = mel_frames_per_chunk

    # -- requests ----------------------------------------------------------------------------
    def transcription(self, audio: np.ndarray, language: str | None) -> Encoded:
        from mistral_common.protocol.transcription.request import TranscriptionRequest

        try:
            request = TranscriptionRequest.model_validate(
                {"model": self.model_id, "audio": encode_wav_float32(audio), "language": language}
            )
        except ValueError as exc:
            raise InvalidRequest(f"Invalid transcription request: {_first_line(exc)}", param="language") from exc
        tokenized = self.mistral.encode_transcription(request)
        return self._encoded(tokenized)

    def translation(self, audio: np.ndarray) -> Encoded:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "audio": audio},
                    {"type": "text", "text": TRANSLATE_INSTRUCTION},
                ],
            }
        ]
        return self.chat(messages)

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Encoded:
        """`messages` are OpenAI-shaped dicts whose audio parts carry decoded arrays under `audio`."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        wire = [_to_mistral_message(m) for m in messages]
        try:
            request = ChatCompletionRequest.from_openai(messages=wire, tools=tools or None)
            tokenized = self.mistral.encode_chat_completion(request)
        except (ValueError, TypeError, AssertionError) as exc:
            raise InvalidRequest(_explain(exc), param="messages") from exc
        return self._encoded(tokenized)

    # -- pieces ------------------------------------------------------------------------------
    def features(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """(n_chunks, n_mels, frames): the processor's `_retrieve_input_features`, array by array."""
        chunks = []
        for array in arrays:
            mel = self.feature_extractor(
                array,
                sampling_rate=SAMPLE_RATE,
                padding=True,
                truncation=False,
                pad_to_multiple_of=CHUNK_SAMPLES,
                return_tensors="pt",
            )["input_features"]
            chunks.append(mel.reshape(self.feature_extractor.feature_size, -1, self.mel_frames).transpose(0, 1))
        return torch.cat(chunks)

    def _encoded(self, tokenized: Any) -> Encoded:
        arrays = [a.audio_array for a in tokenized.audios]
        seconds = sum(a.shape[-1] for a in arrays) / SAMPLE_RATE
        features = self.features(arrays) if arrays else None
        return Encoded(list(tokenized.tokens), features, seconds)


def _to_mistral_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if part.get("type") == "input_audio":
            parts.append({"type": "input_audio", "input_audio": encode_wav_float32(part["audio"])})
        else:
            parts.append(part)
    return {**message, "content": parts}


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _explain(exc: Exception) -> str:
    text = _first_line(exc)
    if "System messages are not yet allowed" in text or "system" in text.lower():
        raise UnsupportedFeature(
            "Voxtral does not support system prompts when audio is present "
            f"(the model card: no system-prompt support). Tokenizer said: {text}",
            param="messages",
        ) from exc
    return f"Could not build the prompt: {text}"
