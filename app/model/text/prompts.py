"""Conversation -> token ids + mel features, exactly as Voxtral's reference usage builds them.

Prompts go through mistral-common (the library Voxtral's processor uses) so that tools and
tool-result turns are rendered, which `VoxtralProcessor.apply_chat_template` silently drops.
The audio comes out as mistral-common prepares it for the processor (16 kHz, padded to whole
30 s windows); the worker turns it into mel features (features.py). Runs on CPU threads before
the queue, never on the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.audio import encode_wav_float32, samples_key
from app.errors import InvalidRequest, UnsupportedFeature, first_line

TRANSLATE_INSTRUCTION = "Translate this audio into English. Answer with the translation only."


@dataclass
class Encoded:
    input_ids: list[int]
    audios: list[np.ndarray]
    """As mistral-common prepared them: 16 kHz, padded to whole 30 s windows, prompt order."""


class Prompter:
    """Owns the tokenizer of one checkpoint."""

    def __init__(self, processor: Any, model_id: str) -> None:
        self.processor = processor
        self.model_id = model_id
        self.mistral = processor.tokenizer.tokenizer

    @property
    def tekken(self) -> Any:
        """mistral-common's tekken tokenizer: token bytes and special ids (read by `ModelRuntime`)."""
        return self.mistral.instruct_tokenizer.tokenizer

    # -- requests ----------------------------------------------------------------------------
    def transcription(self, audio: np.ndarray, language: str | None) -> Encoded:
        """Mistral's transcription format: the audio, then `lang:xx` when the language is known, then
        [TRANSCRIBE]. It has no slot for a text prompt."""
        from mistral_common.protocol.transcription.request import TranscriptionRequest

        try:
            request = TranscriptionRequest.model_validate(
                {"model": self.model_id, "audio": encode_wav_float32(audio), "language": language}
            )
        except ValueError as exc:
            raise InvalidRequest(f"Invalid transcription request: {first_line(exc)}", param="language") from exc
        tokenized = self.mistral.encode_transcription(request)
        return self._encoded(tokenized)

    def translation(self, audio: np.ndarray, prompt: str | None = None) -> Encoded:
        """Voxtral has no translation format: it is asked in a chat turn, where the client's `prompt`
        (OpenAI: text to guide style or continue a previous segment) fits as context."""
        instruction = TRANSLATE_INSTRUCTION
        if prompt and prompt.strip():
            instruction += f"\nContext (the text before this audio, names and spellings to use): {prompt.strip()}"
        content = [{"type": "input_audio", "audio": audio}, {"type": "text", "text": instruction}]
        return self.chat([{"role": "user", "content": content}])

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Encoded:
        """`messages` are OpenAI-shaped dicts whose audio parts carry decoded arrays under `audio`."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        wire = [_to_mistral_message(m) for m in messages]
        try:
            request = ChatCompletionRequest.from_openai(messages=wire, tools=tools or None)
            tokenized = self.mistral.encode_chat_completion(request)
        except (MistralCommonException, ValueError, TypeError, KeyError, AssertionError) as exc:
            raise _prompt_error(exc) from exc
        return self._encoded(tokenized)

    # -- pieces ------------------------------------------------------------------------------
    def _encoded(self, tokenized: Any) -> Encoded:
        audios = [a.audio_array for a in tokenized.audios]
        for audio in audios:
            samples_key(audio)  # hashed here, in a request thread: the model's thread finds it remembered
            audio.flags.writeable = False  # the key is remembered per array: its samples may not change
        return Encoded(list(tokenized.tokens), audios)


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


def _prompt_error(exc: Exception) -> InvalidRequest:
    """mistral-common's refusal as a 400 that says what to change.

    The v7/v11 tokenizers refuse a system message next to audio (Voxtral's model card: no system
    prompts); text-only conversations may carry one.
    """
    text = first_line(exc)
    if "System messages are not yet allowed" in text:
        return UnsupportedFeature(
            "Voxtral does not accept a system message in a conversation with audio (the model card: system "
            "prompts are not supported); put the instruction in the user message instead. "
            f"Tokenizer said: {text}",
            param="messages",
        )
    from mistral_common.exceptions import InvalidToolException, InvalidToolSchemaException

    param = "tools" if isinstance(exc, InvalidToolException | InvalidToolSchemaException) else "messages"
    return InvalidRequest(f"Could not build the prompt: {text}", param=param)
