"""Wire models: the JSON bodies clients send, parsed and range-checked at the edge.

Unknown fields are accepted and ignored (real clients and SDKs send fields we do not
support); they are logged at debug level by the route that reads them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputAudio(_Wire):
    data: str
    format: str | None = None


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class InputAudioPart(_Wire):
    type: Literal["input_audio"]
    input_audio: InputAudio | str
    """OpenAI sends {"data", "format"}; Mistral's own clients send the bare base64 string."""


class AudioUrl(_Wire):
    url: str


class AudioUrlPart(_Wire):
    type: Literal["audio_url"]
    audio_url: AudioUrl | str


ContentPart = TextPart | InputAudioPart | AudioUrlPart


class FunctionCall(_Wire):
    name: str
    arguments: str


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Wire):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoiceFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class ChatCompletionRequest(_Wire):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    """vLLM's extra field: keep the k most likely tokens; 0 or -1: off."""
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    """vLLM's extra field: keep tokens at least min_p x as likely as the most likely one; 0: off."""
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    cache_salt: str | None = Field(default=None, min_length=1)
    """vLLM's extra field: only requests with the same salt share cached prompt prefixes (a tenant's secret)."""

    def stop_list(self) -> list[str]:
        """Empty strings dropped: every text contains "", so one would end each answer after a token."""
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]
