"""Wire models of `POST /v1/responses`: the body clients send, parsed and range-checked at the edge.

What the chat use case can answer is modelled (messages with text and audio parts, function calls and their
outputs, function tools, text formats, sampling); other fields are accepted and ignored, as the chat models
do. Item and part types this server cannot read are refused by name when the input is translated
(`responses_input.py`), not here, so the message says which one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from app.serving.schemas import FunctionDef, InputAudio


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputText(_Wire):
    type: Literal["input_text", "output_text", "text"]
    """`output_text`: an earlier answer sent back as input (what the Agents SDK does)."""
    text: str


class InputAudioContent(_Wire):
    """vLLM's spelling of audio in a Responses message (chat's `input_audio` part)."""

    type: Literal["input_audio"]
    input_audio: InputAudio | str


class InputFile(_Wire):
    type: Literal["input_file"]
    file_data: str | None = None
    """A data: URL with base64 (`data:audio/wav;base64,...`), or bare base64."""
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None


class OtherContent(_Wire):
    """A part type this server does not read (images, refusals): refused by name, or skipped for refusals."""

    type: str


def _by_type(tags: dict[str, str], default: str | None = None) -> Callable[[Any], str]:
    """A discriminator: the tag of a dict's or model's `type` (`default` where it has none), else "other"."""

    def tag(value: Any) -> str:
        kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
        return tags.get(kind, "other") if isinstance(kind, str) else "other"

    return tag


Content = Annotated[
    Annotated[InputText, Tag("text")]
    | Annotated[InputAudioContent, Tag("input_audio")]
    | Annotated[InputFile, Tag("input_file")]
    | Annotated[OtherContent, Tag("other")],
    Discriminator(
        _by_type(
            {"input_text": "text", "output_text": "text", "text": "text"}
            | {"input_audio": "input_audio", "input_file": "input_file"}
        )
    ),
]


class MessageItem(_Wire):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Content]


class FunctionCallItem(_Wire):
    """A call the model made earlier, sent back as input by a client that keeps the conversation itself."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Wire):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Content]


class OtherItem(_Wire):
    type: str


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_by_type({t: t for t in ("message", "function_call", "function_call_output")}, default="message")),
]


class FunctionTool(FunctionDef):
    """Responses' flat function tool: `{"type": "function", "name", "description", "parameters", "strict"}`."""

    type: Literal["function"]


class OtherTool(_Wire):
    type: str


class FunctionChoice(_Wire):
    type: Literal["function"]
    name: str


class TextFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextParam(_Wire):
    format: TextFormat | None = None


class CreateResponseRequest(_Wire):
    model: str
    input: str | list[InputItem] = Field(default="")
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    """None: true, as OpenAI's default."""
    stream: bool | None = None
    tools: (
        list[
            Annotated[
                Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
                Discriminator(_by_type({"function": "function"})),
            ]
        ]
        | None
    ) = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    metadata: dict[str, str] | None = None
    user: str | None = None
    cache_salt: str | None = Field(default=None, min_length=1)
    """vLLM's extra field, as chat's: only requests with the same salt share cached prompt prefixes."""
