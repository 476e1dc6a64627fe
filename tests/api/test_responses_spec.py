"""/v1/responses held against OpenAI's published schemas, raw: every response object, every stream event
(the event's own schema and the `ResponseStreamEvent` union), retrieve, delete and error bodies; and a stream
that fails after it began (`error`, then `response.failed`). Needs the spec (tests/support/openapi_spec.py)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

import app.serving.chat as serving_chat
from tests.support.openapi_spec import check, load_spec
from tests.support.server import AUDIO, RunningServer
from tests.support.tool_fixtures import CLOCK, WEATHER

JFK = base64.b64encode((AUDIO / "jfk.wav").read_bytes()).decode()
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    {"type": "function", "name": "get_time", "description": "Time now", "parameters": CLOCK},
]
CASES: dict[str, dict[str, Any]] = {
    "text": {"input": "Hi"},
    "instructions": {"input": [{"role": "user", "content": "Hi"}], "instructions": "Be brief."},
    "input_audio": {
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": JFK, "format": "wav"}},
                    {"type": "input_text", "text": "What is said?"},
                ],
            }
        ]
    },
    "input_file": {
        "input": [{"role": "user", "content": [{"type": "input_file", "file_data": f"data:audio/wav;base64,{JFK}"}]}]
    },
    "tools-auto": {"input": "Weather?", "tools": TOOLS},
    "tool-call": {"input": "Time?", "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_time"}},
    "tool-required": {"input": "Time?", "tools": TOOLS, "tool_choice": "required"},
    "json-schema": {"input": "A city.", "text": {"format": {"type": "json_schema", "name": "c", "schema": WEATHER}}},
    "json-object": {"input": "A city.", "text": {"format": {"type": "json_object"}}},
}
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_spec()


def create(http: httpx.Client, body: dict[str, Any], **extra: Any) -> httpx.Response:
    return http.post("/v1/responses", json={"model": "tiny", "max_output_tokens": 60, **body, **extra})


def stream_events(response: httpx.Response) -> list[dict[str, Any]]:
    """Every event of a Responses SSE body; each block's `event:` line names its data's `type`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in (b for b in response.text.split("\n\n") if b.strip()):
        event_line, data_line = block.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}"
        out.append(data)
    return out


def check_event(spec: dict[str, Any], event: dict[str, Any]) -> None:
    check(spec, EVENT_SCHEMAS[event["type"]], event)
    check(spec, "ResponseStreamEvent", event)


@pytest.mark.parametrize("case", list(CASES))
def test_response_object(http: httpx.Client, spec: dict[str, Any], case: str) -> None:
    r = create(http, CASES[case])
    assert r.status_code == 200, r.text
    check(spec, "Response", r.json())
    got = http.get(f"/v1/responses/{r.json()['id']}")
    assert got.status_code == 200 and got.json() == r.json()
    check(spec, "Response", got.json())
    if case.startswith("tool-call"):
        assert r.json()["output"][0]["type"] == "function_call"


@pytest.mark.parametrize("case", list(CASES))
def test_every_stream_event(http: httpx.Client, spec: dict[str, Any], case: str) -> None:
    events = stream_events(create(http, CASES[case], stream=True))
    for event in events:
        check_event(spec, event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] in {"response.completed", "response.incomplete"}
    final = events[-1]["response"]
    assert final["usage"]["total_tokens"] > 0
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]
    if case == "tool-call":
        assert final["output"][0]["type"] == "function_call" and final["status"] == "completed"


def test_delete_and_a_missing_response(http: httpx.Client, spec: dict[str, Any]) -> None:
    made = create(http, CASES["text"], max_output_tokens=4).json()
    gone = http.delete(f"/v1/responses/{made['id']}")
    assert gone.json() == {"id": made["id"], "object": "response", "deleted": True}
    for missing in (http.get(f"/v1/responses/{made['id']}"), http.delete(f"/v1/responses/{made['id']}")):
        assert missing.status_code == 404
        check(spec, "ErrorResponse", missing.json())
    refused = create(http, CASES["text"], previous_response_id=made["id"])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "previous_response_id"
    check(spec, "ErrorResponse", refused.json())


@pytest.mark.parametrize(
    "body",
    [
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]},
        {"input": "Hi", "tools": [{"type": "web_search"}]},
        {"input": "Hi", "max_output_tokens": 0},
        {"input": "Hi", "tool_choice": {"type": "function", "name": "nothing"}},
    ],
)
def test_error_bodies(http: httpx.Client, spec: dict[str, Any], body: dict[str, Any]) -> None:
    r = create(http, body)
    assert r.status_code == 400, r.text
    check(spec, "ErrorResponse", r.json())


def _failing_after_first(source: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(*args: Any) -> AsyncIterator[Any]:
        async for delta in source(*args):
            yield delta
            raise RuntimeError("injected failure")

    return wrapped


def test_a_stream_that_fails(server: RunningServer, spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving_chat, "chat_deltas", _failing_after_first(serving_chat.chat_deltas))
    with server.http() as http:
        events = stream_events(create(http, CASES["text"], stream=True))
    for event in events:
        check_event(spec, event)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert "injected" not in events[2]["message"]  # no internals leave the server
    assert events[3]["response"]["status"] == "failed" and events[3]["response"]["error"]["code"] == "server_error"
