"""Results -> the exact bodies OpenAI clients parse (JSON objects, plain text, SSE lines)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from app.api.chat_request import ChatJob
from app.api.logprobs import chat_logprobs
from app.model.callstream import ChatOutput, chat_output
from app.model.toolcalls import ParsedCall
from app.types import GenerationResult


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_completion(
    model: str,
    fingerprint: str,
    choices: list[tuple[ChatOutput, dict[str, Any] | None]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """`choices`: each choice's output and its `logprobs` (None when not asked), in index order."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [_choice(i, output, logprobs) for i, (output, logprobs) in enumerate(choices)],
        "usage": chat_usage(prompt_tokens, completion_tokens),
    }


def chat_answer(job: ChatJob, result: GenerationResult, model: str, fingerprint: str) -> dict[str, Any]:
    """A whole chat.completion: each of the `n` choices' tokens read as text or tool calls."""
    stops = job.prepared.sampling.stop_strings
    results = result.choices or [result]
    outputs = [chat_output(r.token_ids, r.finish_reason, job.vocab, job.tool_names, stops) for r in results]
    choices = [(out, chat_logprobs(job.vocab, r.logprobs)) for out, r in zip(outputs, results, strict=True)]
    completion_tokens = sum(len(r.token_ids) for r in results)  # the prompt counts once, every choice's tokens
    return chat_completion(model, fingerprint, choices, result.prompt_tokens, completion_tokens)


def _choice(index: int, output: ChatOutput, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": output.content, "refusal": None}
    if output.calls:
        message["tool_calls"] = [tool_call(call) for call in output.calls]
    return {"index": index, "message": message, "finish_reason": output.finish_reason, "logprobs": logprobs}


def tool_call(call: ParsedCall, index: int | None = None) -> dict[str, Any]:
    """OpenAI's tool call; with `index`, the shape of a streamed `delta.tool_calls` entry."""
    body: dict[str, Any] = {"index": index} if index is not None else {}
    body.update(id=call.id, type="function", function={"name": call.name, "arguments": call.arguments})
    return body


def chat_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Chat completions' usage object (the transcription shape is `transcripts.transcription_usage`)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


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
