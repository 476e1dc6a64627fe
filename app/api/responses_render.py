"""Typed responses -> OpenAI's Response object and its output items (`Response` in OpenAI's spec)."""

from __future__ import annotations

from typing import Any

from app.serving.responses_schemas import CreateResponseRequest
from app.serving.responses_values import CallOut, OutputItem, ResponseObject, TokenUsage


def response(value: ResponseObject) -> dict[str, Any]:
    """The whole object: status, output, usage (absent until known), and the request's settings echoed."""
    body: dict[str, Any] = {
        "id": value.id,
        "object": "response",
        "created_at": value.created_at,
        "status": value.status,
        "completed_at": value.completed_at,
        "error": None if value.error is None else {"code": "server_error", "message": value.error},
        "incomplete_details": {"reason": "max_output_tokens"} if value.status == "incomplete" else None,
        "output": [item(i) for i in value.output],
        **settings(value.request),
    }
    if value.usage is not None:
        body["usage"] = usage(value.usage)
    return body


def settings(request: CreateResponseRequest) -> dict[str, Any]:
    """The request's settings as the response echoes them (OpenAI's defaults where it set none)."""
    tool_fields = {"type", "name", "description", "parameters", "strict"}
    choice, text = request.tool_choice, request.text
    fmt = text.format if text is not None else None
    return {
        "model": request.model,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "previous_response_id": request.previous_response_id,
        "store": request.store is not False,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tools": [t.model_dump(mode="json", include=tool_fields) for t in request.tools or ()],
        "tool_choice": choice.model_dump(mode="json") if not isinstance(choice, str | None) else choice or "auto",
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "text": {"format": fmt.model_dump(mode="json", by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "truncation": "disabled",
        "metadata": request.metadata or {},
        "reasoning": None,
    }


def item(value: OutputItem) -> dict[str, Any]:
    if isinstance(value, CallOut):
        return {
            "type": "function_call",
            "id": value.id,
            "call_id": value.call_id,
            "name": value.name,
            "arguments": value.arguments,
            "status": value.status,
        }
    parts = [text_part(value.text)] if value.status != "in_progress" else []
    return {"type": "message", "id": value.id, "status": value.status, "role": "assistant", "content": parts}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage(value: TokenUsage) -> dict[str, Any]:
    return {
        "input_tokens": value.input_tokens,
        "input_tokens_details": {"cached_tokens": value.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": value.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": value.input_tokens + value.output_tokens,
    }
