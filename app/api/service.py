"""From a parsed request to a finished generation: resolve the model, decode audio, build the
prompt (CPU threads, off the event loop), check limits, then hand it to the engine.

Everything that can be refused is refused here, before the queue, so the worker only sees
requests it can run.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from app.api.schemas import AudioUrlPart, ChatCompletionRequest, InputAudioPart, Message
from app.audio import SAMPLE_RATE, AudioLimits, decode_audio
from app.config import Settings
from app.engine.engine import Engine
from app.errors import (
    AudioDecodeError,
    AudioTooLong,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    UnsupportedFeature,
)
from app.model.prompts import Encoded, Prompter
from app.types import PreparedRequest, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
_LANG_PREFIX = re.compile(r"^\s*lang:([a-z]{2,3})\s*")
_DATA_URL = re.compile(r"^data:([^;,]*)(;base64)?,(.*)$", re.DOTALL)


@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    audio_seconds: float
    language: str | None = None


class Service:
    def __init__(self, settings: Settings, engine: Engine, prompter: Prompter, tokenizer: Any) -> None:
        self.settings = settings
        self.engine = engine
        self.prompter = prompter
        self.tokenizer = tokenizer
        self.model_ids = {settings.model_id, settings.model, *settings.model_aliases}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="voxtral-prep")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_model(self, model: str | None) -> None:
        if model and model not in self.model_ids:
            raise ModelNotFound(
                f"The model {model!r} does not exist. This server serves {self.settings.model_id!r}.",
                param="model",
            )

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # -- transcription / translation -------------------------------------------------------------
    async def load_audio(self, data: bytes, filename: str | None, max_seconds: float) -> np.ndarray:
        if len(data) > self.settings.max_upload_bytes:
            raise PayloadTooLarge(f"The file is larger than the {self.settings.max_upload_mb:g} MB limit.")
        return await self._off_loop(decode_audio, data, AudioLimits(max_seconds=max_seconds), filename)

    def transcription_budget(self, seconds: float) -> int:
        s = self.settings
        return int(s.transcription_min_tokens + s.transcription_tokens_per_audio_s * seconds)

    async def transcribe(self, audio: np.ndarray, language: str | None, temperature: float, task: str) -> TextResult:
        if task == "translate":
            encoded = await self._off_loop(self.prompter.translation, audio)
        else:
            encoded = await self._off_loop(self.prompter.transcription, audio, language)
        seconds = audio.shape[0] / SAMPLE_RATE
        sampling = SamplingParams(temperature=temperature, max_new_tokens=self.transcription_budget(seconds))
        prepared = self._prepared(encoded, sampling, "translation" if task == "translate" else "transcription")
        result = await self.engine.generate(prepared)
        text = self.decode(result.token_ids)
        detected = _LANG_PREFIX.match(text)
        if detected:
            text = text[detected.end() :]
        used = language or (detected.group(1) if detected else None)
        return TextResult(
            text.strip(),
            result.token_ids,
            result.finish_reason,
            result.prompt_tokens,
            len(result.token_ids),
            seconds,
            "en" if task == "translate" else used,
        )

    # -- chat ------------------------------------------------------------------------------------
    async def prepare_chat(self, body: ChatCompletionRequest) -> PreparedRequest:
        self.check_model(body.model)
        self._check_unsupported(body)
        messages = [await self._message(m) for m in body.messages]
        n_audio = sum(1 for m in messages for p in _parts(m) if p.get("type") == "input_audio")
        if n_audio > self.settings.max_audios_per_request:
            raise InvalidRequest(
                f"{n_audio} audio parts in one request; the limit is {self.settings.max_audios_per_request}.",
                param="messages",
            )
        total = sum(p["audio"].shape[0] for m in messages for p in _parts(m) if "audio" in p) / SAMPLE_RATE
        if total > self.settings.max_chat_audio_s:
            raise AudioTooLong(
                f"The request holds {total:.1f} s of audio; the limit is {self.settings.max_chat_audio_s:g} s."
            )
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        if body.tool_choice == "none":
            tools = None
        encoded = await self._off_loop(self.prompter.chat, messages, tools)
        return self._prepared(encoded, self._chat_sampling(body, len(encoded.input_ids)), "chat")

    def _check_unsupported(self, body: ChatCompletionRequest) -> None:
        if body.n != 1:
            raise UnsupportedFeature("Only n=1 is supported; send several requests for several choices.", param="n")
        if body.logprobs or body.top_logprobs:
            raise UnsupportedFeature("logprobs are not supported by this server.", param="logprobs")

    def _chat_sampling(self, body: ChatCompletionRequest, prompt_tokens: int) -> SamplingParams:
        context = self.settings.context_length
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and prompt_tokens + asked > context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. The request has {prompt_tokens} prompt "
                f"tokens (audio included) and asks for {asked} completion tokens ({prompt_tokens + asked} in total).",
                param="max_tokens",
            )
        if prompt_tokens >= context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens; the prompt alone has {prompt_tokens}.",
                param="messages",
            )
        max_new = asked or min(self.settings.default_max_tokens, context - prompt_tokens)
        return SamplingParams(
            temperature=0.2 if body.temperature is None else body.temperature,
            top_p=0.95 if body.top_p is None else body.top_p,
            seed=body.seed,
            max_new_tokens=max_new,
            stop_strings=tuple(body.stop_list()),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
        )

    def _prepared(self, encoded: Encoded, sampling: SamplingParams, kind: Any) -> PreparedRequest:
        return PreparedRequest(encoded.input_ids, encoded.input_features, sampling, kind, encoded.audio_seconds)

    async def _message(self, message: Message) -> dict[str, Any]:
        out: dict[str, Any] = message.model_dump(exclude_none=True, include={"role", "name", "tool_call_id"})
        if message.role == "developer":
            out["role"] = "system"
        if message.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in message.tool_calls]
        if isinstance(message.content, list):
            out["content"] = [await self._part(p) for p in message.content]
        else:
            out["content"] = message.content if message.content is not None else ""
        return out

    async def _part(self, part: Any) -> dict[str, Any]:
        if isinstance(part, InputAudioPart):
            raw = part.input_audio if isinstance(part.input_audio, str) else part.input_audio.data
            data = _b64(raw)
        elif isinstance(part, AudioUrlPart):
            url = part.audio_url if isinstance(part.audio_url, str) else part.audio_url.url
            data = _data_url(url)
        else:
            return {"type": "text", "text": part.text}
        audio = await self.load_audio(data, None, self.settings.max_chat_audio_s)
        return {"type": "input_audio", "audio": audio}


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _b64(raw: str) -> bytes:
    match = _DATA_URL.match(raw)
    if match:
        return _data_url(raw)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise AudioDecodeError("input_audio.data is not valid base64.", param="messages") from None
    if not data:
        raise AudioDecodeError("input_audio.data is empty.", param="messages")
    return data


def _data_url(url: str) -> bytes:
    match = _DATA_URL.match(url)
    if not match:
        raise InvalidRequest(
            "audio_url must be a data: URL (data:audio/wav;base64,...); this server does not fetch remote audio.",
            param="messages",
        )
    mime, is_b64, payload = match.groups()
    if mime and not (mime.startswith("audio/") or mime in {"application/octet-stream", "video/mp4", "video/webm"}):
        raise InvalidRequest(f"audio data URL has MIME type {mime!r}; expected audio/*.", param="messages")
    if not is_b64:
        raise InvalidRequest("audio data URL must be base64-encoded.", param="messages")
    return _b64(payload)
