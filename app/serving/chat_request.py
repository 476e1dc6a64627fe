"""A chat request, read: messages in Mistral's shape (call ids mapped), what the output must look like
(tool_choice, response_format), sampling, and the limits checked before anything is queued.

Pure functions of the wire model and the settings; the chat use case (chat.py) runs them and does the slow parts
(audio decoding, prompt building, grammar compiling) off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.errors import AudioDecodeError, ContextLengthExceeded, GrammarError, InvalidRequest
from app.model.runtime import ModelRuntime
from app.model.values import MAX_PARALLEL_CALLS, FunctionSpec, OutputSpec
from app.serving.schemas import ChatCompletionRequest, Message, NamedToolChoice
from app.types import PreparedRequest, SamplingParams

_DATA_URL = re.compile(r"^data:([^;,]*)(;base64)?,(.*)$", re.DOTALL)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class ChatJob:
    """A prepared chat request and what its output is read with."""

    prepared: PreparedRequest
    runtime: ModelRuntime
    tool_names: frozenset[str] | None
    """The functions the model may call; None: tool calls are off and call-like output stays text."""


MAX_CHOICES = 16
"""Most choices (`n`) of one request: its rows share one prefill and run in one batch."""


def check_unsupported(body: ChatCompletionRequest, max_batch_size: int) -> None:
    most = min(MAX_CHOICES, max_batch_size)
    if body.n > most:
        raise InvalidRequest(f"n is {body.n}; this server answers at most {most} choices a request.", param="n")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true.", param="top_logprobs")


def minimum_refused(asked: int, minimum: int) -> InvalidRequest:
    """max_tokens below the shortest output a forced call or format can take: refused before queueing."""
    return InvalidRequest(
        f"max_tokens is {asked}, but the forced output (tool call or response_format) needs at least {minimum} "
        f"tokens to complete; set max_tokens to {minimum} or more.",
        param="max_tokens",
    )


def chat_sampling(body: ChatCompletionRequest, prompt_tokens: int, settings: Settings) -> SamplingParams:
    context = settings.context_length
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
    return SamplingParams(
        temperature=0.2 if body.temperature is None else body.temperature,
        top_p=0.95 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        seed=body.seed,
        max_new_tokens=asked or min(settings.default_max_tokens, context - prompt_tokens),
        stop_strings=tuple(body.stop_list()),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        choices=body.n,
    )


# -- tools and formats ------------------------------------------------------------------------------
def output_spec(body: ChatCompletionRequest) -> OutputSpec:
    """tool_choice: none (tools not offered), auto (the model decides; a call it starts is well formed),
    required or a named function (forced); response_format json_object / json_schema (forced)."""
    functions = tuple(FunctionSpec(t.function.name, t.function.parameters or _NO_PARAMETERS) for t in body.tools or ())
    choice = body.tool_choice or ("auto" if functions else "none")
    if choice != "none" and choice != "auto" and not functions:
        raise InvalidRequest("tool_choice requires tools: the request offers none.", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        functions = tuple(f for f in functions if f.name == choice.function.name)
        if not functions:
            raise InvalidRequest(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools.",
                param="tool_choice",
            )
    parallel = body.parallel_tool_calls is not False and not isinstance(choice, NamedToolChoice)
    mode = "required" if isinstance(choice, NamedToolChoice) else choice
    return OutputSpec(functions, mode, MAX_PARALLEL_CALLS if parallel else 1, _json_schema(body))


def _json_schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _ANY_OBJECT
    schema = (fmt.json_schema or {}).get("schema", _ANY_OBJECT)
    if fmt.json_schema is None or not isinstance(schema, dict):
        raise InvalidRequest(
            'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}.',
            param="response_format.json_schema",
        )
    return schema


def prompt_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools rendered into the prompt: none with tool_choice=none, as OpenAI does not offer them."""
    if not body.tools or body.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


def tool_names(spec: OutputSpec) -> frozenset[str] | None:
    return frozenset(f.name for f in spec.functions) if spec.functions and spec.tool_mode != "none" else None


def grammar_refused(spec: OutputSpec, exc: GrammarError) -> InvalidRequest:
    param = "tools" if tool_names(spec) is not None else "response_format"
    return InvalidRequest(f"The {param} schema cannot be used for constrained decoding: {exc}", param=param)


# -- messages -----------------------------------------------------------------------------------------
def message_fields(message: Message) -> dict[str, Any]:
    """Everything but the content parts, in Mistral's terms: 9-character call ids, system for developer."""
    out: dict[str, Any] = message.model_dump(exclude_none=True, include={"role", "name"})
    if message.role == "developer":
        out["role"] = "system"
    if message.role == "tool":
        if not message.tool_call_id:
            raise InvalidRequest("A message with role 'tool' needs the tool_call_id it answers.", param="messages")
        out["tool_call_id"] = ModelRuntime.call_id(message.tool_call_id)
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": ModelRuntime.call_id(c.id), "type": "function", "function": c.function.model_dump()}
            for c in message.tool_calls
        ]
    if not isinstance(message.content, list):
        out["content"] = message.content or (None if message.tool_calls else "")
    return out


def b64_audio(raw: str) -> bytes:
    if _DATA_URL.match(raw):
        return data_url_audio(raw)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise AudioDecodeError("input_audio.data is not valid base64.", param="messages") from None
    if not data:
        raise AudioDecodeError("input_audio.data is empty.", param="messages")
    return data


def data_url_audio(url: str) -> bytes:
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
    return b64_audio(payload)
