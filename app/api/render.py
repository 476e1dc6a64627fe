"""Results -> the exact bodies OpenAI clients parse: chat JSON objects and chunks, log-prob entries."""

from __future__ import annotations

import time
import uuid
from typing import Any

from app.serving.chat import ChatResult, ChoiceResult
from app.serving.logprobs import TokenScore
from app.types import ParsedCall


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_completion(result: ChatResult, model: str, fingerprint: str) -> dict[str, Any]:
    """A whole chat.completion: each of the `n` choices, in index order."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [_choice(i, choice) for i, choice in enumerate(result.choices)],
        "usage": chat_usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
    }


def _choice(index: int, choice: ChoiceResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.content, "refusal": None}
    if choice.calls:
        message["tool_calls"] = [tool_call(call) for call in choice.calls]
    return {
        "index": index,
        "message": message,
        "finish_reason": choice.finish_reason,
        "logprobs": chat_logprobs(choice.logprobs),
    }


def tool_call(call: ParsedCall) -> dict[str, Any]:
    """OpenAI's tool call, as a non-streamed `message.tool_calls` entry (streamed ones: `api/chat_events.py`)."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """Chat completions' usage object (the transcription shape is `transcripts.usage`); `cached_tokens`: the
    prompt tokens taken from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_logprobs(scores: list[TokenScore] | None) -> dict[str, Any] | None:
    """A choice's `logprobs`: None when the request did not ask."""
    return None if scores is None else {"content": logprob_entries(scores), "refusal": None}


def logprob_entries(scores: list[TokenScore]) -> list[dict[str, Any]]:
    """OpenAI's log-prob entries: token, logprob, bytes, and (chat) `top_logprobs`."""
    return [_entry(score) for score in scores]


def _entry(score: TokenScore) -> dict[str, Any]:
    entry: dict[str, Any] = {"token": score.token, "logprob": score.logprob, "bytes": list(score.raw)}
    if score.top is not None:
        entry["top_logprobs"] = [_entry(alternative) for alternative in score.top]
    return entry


def chat_chunk(
    chunk_id: str, model: str, fingerprint: str, created: int, delta: dict[str, Any], finish_reason: str | None
) -> dict[str, Any]:
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
