"""POST /v1/responses through the official `openai` client: text, audio (input_audio and input_file),
instructions, tools, structured output, streaming events in order, stored responses and follow-ups."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.support.server import AUDIO
from tests.support.tool_fixtures import CLOCK, WEATHER

JFK = base64.b64encode((AUDIO / "jfk.wav").read_bytes()).decode()
AUDIO_PART = {"type": "input_audio", "input_audio": {"data": JFK, "format": "wav"}}
FILE_PART = {"type": "input_file", "filename": "jfk.wav", "file_data": f"data:audio/wav;base64,{JFK}"}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    {"type": "function", "name": "get_time", "description": "Time now", "parameters": CLOCK},
]
FORCED = {"type": "function", "name": "get_time"}


def ask(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [part, {"type": "input_text", "text": "What is said?"}]}]


def test_text(client: Any) -> None:
    r = client.responses.create(model="tiny", input="Hi", max_output_tokens=16, temperature=0, top_p=0.9)
    assert r.object == "response" and r.id.startswith("resp_") and r.status in {"completed", "incomplete"}
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.output_text == r.output[0].content[0].text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 16
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.temperature == 0 and r.top_p == 0.9 and r.max_output_tokens == 16 and r.store is True
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_the_same_tokens_as_chat(client: Any) -> None:
    """Built on the chat use case: the same prompt and seedless greedy decoding give the same text."""
    r = client.responses.create(model="tiny", input="Hi", max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("part", [AUDIO_PART, FILE_PART], ids=["input_audio", "input_file"])
def test_audio(client: Any, part: dict[str, Any]) -> None:
    r = client.responses.create(model="tiny", input=ask(part), max_output_tokens=8)
    text_only = client.responses.create(model="tiny", input="What is said?", max_output_tokens=8)
    assert r.usage.input_tokens > text_only.usage.input_tokens + 100  # 11 s of audio: ~138 audio tokens


def test_instructions(client: Any) -> None:
    plain = client.responses.create(model="tiny", input="Hi", max_output_tokens=4)
    told = client.responses.create(model="tiny", input="Hi", instructions="Be brief.", max_output_tokens=4)
    assert told.instructions == "Be brief." and told.usage.input_tokens > plain.usage.input_tokens


def test_instructions_with_audio_are_a_400(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="system") as refused:
        client.responses.create(model="tiny", input=ask(AUDIO_PART), instructions="Be brief.", max_output_tokens=4)
    assert refused.value.param == "input"  # chat's refusal, named in Responses' terms


def test_a_forced_tool_call_and_its_output(client: Any) -> None:
    r = client.responses.create(model="tiny", input="Time?", tools=TOOLS, tool_choice=FORCED, max_output_tokens=100)
    assert r.status == "completed" and [i.type for i in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_time" and call.id.startswith("fc_") and call.call_id
    jsonschema.validate(json.loads(call.arguments), CLOCK)
    follow = client.responses.create(
        model="tiny",
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"time": "12:00"}'}],
        tools=TOOLS,
        max_output_tokens=8,
    )
    assert follow.previous_response_id == r.id and follow.usage.input_tokens > r.usage.input_tokens


def test_client_kept_history_with_a_function_call(client: Any) -> None:
    """The Agents SDK's way without previous_response_id: the call and its output sent back as items."""
    items = [
        {"role": "user", "content": "Time?"},
        {"type": "function_call", "call_id": "call_abc", "name": "get_time", "arguments": '{"tz": "UTC"}'},
        {"type": "function_call_output", "call_id": "call_abc", "output": "12:00"},
    ]
    r = client.responses.create(model="tiny", input=items, tools=TOOLS, max_output_tokens=8, store=False)
    assert r.usage.input_tokens > 10 and r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_json_schema(client: Any) -> None:
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    r = client.responses.create(model="tiny", input="A city.", text={"format": fmt}, max_output_tokens=60)
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), WEATHER)
    assert r.text.format.type == "json_schema"


def test_previous_response_id_continues_the_conversation(client: Any) -> None:
    first = client.responses.create(model="tiny", input=ask(AUDIO_PART), max_output_tokens=6)
    follow = client.responses.create(model="tiny", previous_response_id=first.id, input="And?", max_output_tokens=6)
    # the whole first turn (audio, question, answer) is the follow-up's prefix
    assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    third = client.responses.create(model="tiny", previous_response_id=follow.id, input="More?", max_output_tokens=4)
    assert third.usage.input_tokens > follow.usage.input_tokens + follow.usage.output_tokens


def test_retrieve_and_delete(client: Any) -> None:
    r = client.responses.create(model="tiny", input="Hi", max_output_tokens=4, metadata={"k": "v"})
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage == r.usage and got.metadata == {"k": "v"}
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError, match="not found") as refused:
        client.responses.create(model="tiny", previous_response_id=r.id, input="And?")
    assert refused.value.code == "previous_response_not_found"


def test_a_chain_with_a_deleted_link_is_refused(client: Any) -> None:
    first = client.responses.create(model="tiny", input="Hi", max_output_tokens=4)
    second = client.responses.create(model="tiny", previous_response_id=first.id, input="And?", max_output_tokens=4)
    client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError, match="deleted or has expired"):
        client.responses.create(model="tiny", previous_response_id=second.id, input="More?")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "file_data"),
        ({"input": [{"type": "reasoning", "id": "r", "summary": []}]}, "reasoning"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "web_search"),
        ({"input": ""}, "input is empty"),
        ({"input": "Hi", "model": "gpt-nothing"}, "gpt-nothing"),
    ],
)
def test_refusals(client: Any, body: dict[str, Any], match: str) -> None:
    with pytest.raises((openai.BadRequestError, openai.NotFoundError), match=match):
        client.responses.create(**{"model": "tiny", **body})


# -- streaming ----------------------------------------------------------------------------------------
def test_stream_text_events_in_order(client: Any) -> None:
    with client.responses.stream(model="tiny", input="Hi", max_output_tokens=10) as stream:
        events = list(stream)
    final = events[-1].response  # the helper's get_final_response() wants response.completed; this may be incomplete
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if final.status == "completed" else "response.incomplete",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == text


def test_stream_a_tool_call(client: Any) -> None:
    with client.responses.stream(
        model="tiny", input="Time?", tools=TOOLS, tool_choice=FORCED, max_output_tokens=100
    ) as stream:
        events = list(stream)
        assert stream.get_final_response().output[0].name == "get_time"
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = events[-3]
    assert done.arguments == arguments and done.name == "get_time"
    jsonschema.validate(json.loads(arguments), CLOCK)
    final = events[-1].response
    assert final.output[0].arguments == arguments and final.usage.total_tokens > 0


def test_create_stream_true_with_json_schema(client: Any) -> None:
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER}
    events = list(
        client.responses.create(model="tiny", input="A city.", text={"format": fmt}, max_output_tokens=60, stream=True)
    )
    assert events[-1].type == "response.completed"
    jsonschema.validate(json.loads(events[-1].response.output_text), WEATHER)
