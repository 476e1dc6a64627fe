"""A Responses request read as the chat use case's request: its input items as chat messages, its tools,
tool_choice and text format in chat's terms; and a response's output as the assistant message a follow-up
(`previous_response_id`) continues from.

Pure functions of the wire models. The chat use case then does everything else (audio decoding, prompt,
grammar, limits): a request refused by chat is refused here the same way.
"""

from __future__ import annotations

from typing import Literal

from app.errors import InvalidRequest, UnsupportedFeature
from app.serving.responses_schemas import (
    Content,
    CreateResponseRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionTool,
    InputAudioContent,
    InputFile,
    InputItem,
    InputText,
    MessageItem,
)
from app.serving.responses_values import CallOut, MessageOut, OutputItem
from app.serving.schemas import (
    AudioUrlPart,
    ChatCompletionRequest,
    ContentPart,
    FunctionCall,
    FunctionDef,
    InputAudioPart,
    Message,
    NamedToolChoice,
    NamedToolChoiceFunction,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
)


def chat_request(body: CreateResponseRequest, conversation: list[Message]) -> ChatCompletionRequest:
    """The chat request that answers `body`: its instructions (a system message, not carried over to
    follow-ups, as OpenAI does), then `conversation` (earlier turns and this one's input)."""
    system = [Message(role="system", content=body.instructions)] if body.instructions else []
    if not conversation:
        raise InvalidRequest("input is empty: send a string or at least one message item.", param="input")
    return ChatCompletionRequest(
        model=body.model,
        messages=system + conversation,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stream=bool(body.stream),
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_format(body),
        cache_salt=body.cache_salt,
    )


def input_messages(body: CreateResponseRequest) -> list[Message]:
    """This turn's input as chat messages; consecutive function calls join one assistant message."""
    if isinstance(body.input, str):
        return [Message(role="user", content=body.input)] if body.input else []
    messages: list[Message] = []
    for item in body.input:
        message = _message(item)
        last = messages[-1] if messages else None
        if isinstance(item, FunctionCallItem) and last is not None and last.role == "assistant":
            last.tool_calls = [*(last.tool_calls or []), *(message.tool_calls or [])]
        else:
            messages.append(message)
    return messages


def output_message(output: tuple[OutputItem, ...]) -> Message:
    """A response's output as the assistant message of the conversation it continues."""
    text = "".join(item.text for item in output if isinstance(item, MessageOut))
    calls = [
        ToolCall(id=i.call_id, function=FunctionCall(name=i.name, arguments=i.arguments))
        for i in output
        if isinstance(i, CallOut)
    ]
    return Message(role="assistant", content=text or None, tool_calls=calls or None)


# -- input items ----------------------------------------------------------------------------------------
def _message(item: InputItem) -> Message:
    if isinstance(item, MessageItem):
        return Message(role=item.role, content=_content(item))
    if isinstance(item, FunctionCallItem):
        call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
        return Message(role="assistant", content=None, tool_calls=[call])
    if isinstance(item, FunctionCallOutputItem):
        output = item.output if isinstance(item.output, str) else _text(item.output, "function_call_output")
        return Message(role="tool", content=output, tool_call_id=item.call_id)
    raise UnsupportedFeature(
        f"Input items of type {item.type!r} are not supported: this server reads message, function_call and "
        "function_call_output items.",
        param="input",
    )


def _content(item: MessageItem) -> str | list[ContentPart]:
    if isinstance(item.content, str):
        return item.content
    if item.role != "user":  # chat reads audio in user messages only; other roles' parts are text
        return _text(item.content, f"{item.role} message")
    return [_part(p) for p in item.content]


def _text(parts: list[Content], where: str) -> str:
    if not all(isinstance(p, InputText) for p in parts):
        kinds = sorted({p.type for p in parts if not isinstance(p, InputText)})
        raise UnsupportedFeature(f"A {where} may hold only text parts; it has {', '.join(kinds)}.", param="input")
    return "".join(p.text for p in parts if isinstance(p, InputText))


def _part(part: Content) -> ContentPart:
    if isinstance(part, InputText):
        return TextPart(type="text", text=part.text)
    if isinstance(part, InputAudioContent):
        return InputAudioPart(type="input_audio", input_audio=part.input_audio)
    if isinstance(part, InputFile):
        return _file(part)
    raise UnsupportedFeature(
        f"Content parts of type {part.type!r} are not supported: this server reads input_text, input_audio "
        "and input_file (audio).",
        param="input",
    )


def _file(part: InputFile) -> ContentPart:
    """An audio file inline: a data: URL, or bare base64. No Files API, no fetching of remote files."""
    if not part.file_data:
        raise UnsupportedFeature(
            "input_file needs file_data (a data: URL with base64 audio); this server has no Files API and "
            "does not fetch file_url.",
            param="input",
        )
    if part.file_data.startswith("data:"):
        return AudioUrlPart(type="audio_url", audio_url=part.file_data)
    return InputAudioPart(type="input_audio", input_audio=part.file_data)


# -- tools and formats ------------------------------------------------------------------------------------
def _tools(body: CreateResponseRequest) -> list[Tool] | None:
    if not body.tools:
        return None
    others = sorted({t.type for t in body.tools if not isinstance(t, FunctionTool)})
    if others:
        raise UnsupportedFeature(
            f"Tools of type {', '.join(others)} are not supported: this server calls function tools only.",
            param="tools",
        )
    functions = [t.model_dump(exclude={"type"}, exclude_none=True) for t in body.tools]
    return [Tool(type="function", function=FunctionDef.model_validate(f)) for f in functions]


def _tool_choice(body: CreateResponseRequest) -> Literal["none", "auto", "required"] | NamedToolChoice | None:
    choice = body.tool_choice
    if isinstance(choice, FunctionChoice):
        return NamedToolChoice(type="function", function=NamedToolChoiceFunction(name=choice.name))
    return choice


def _format(body: CreateResponseRequest) -> ResponseFormat | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else ResponseFormat(type=fmt.type)
    schema = {"name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict}
    return ResponseFormat(type="json_schema", json_schema={k: v for k, v in schema.items() if v is not None})
