"""Tools through the openai SDK against the real server and the tiny random model: rendered into the prompt,
forced calls (named, required), auto, parallel calls, tool-result turns, streaming calls, JSON output."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from app.config import Settings
from app.model.compute.loader import load_model
from app.model.text.toolcalls import mistral_call_id
from app.model.tiny import build_tiny_model
from app.serving.schemas import ChatCompletionRequest
from tests.support.checks import assert_openai_error
from tests.support.server import RunningServer, serve
from tests.support.tool_fixtures import (
    CALL_ID,
    CLOCK,
    NAMED,
    SCHEMAS,
    TOOLS,
    WEATHER,
    assert_valid_calls,
    streamed_calls,
)

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def create(client: Any, **kw: Any) -> Any:
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model="tiny", **kw)


def prompt_of(server: RunningServer, body: dict[str, Any]) -> str:
    """The prompt the server would run, special tokens written out."""
    serving = server.context.serving
    job = asyncio.run(serving.chats.prepare(ChatCompletionRequest.model_validate({"model": "tiny", **body})))
    return job.runtime.vocab.text(job.prepared.input_ids, keep_special=True)


# -- the prompt ----------------------------------------------------------------------------------------
def test_tools_are_rendered_as_mistrals_available_tools_block(server: RunningServer) -> None:
    prompt = prompt_of(server, {"messages": ASK, "tools": TOOLS})
    block = prompt[prompt.index("[AVAILABLE_TOOLS]") : prompt.index("[/AVAILABLE_TOOLS]")]
    assert '"name": "get_weather"' in block and '"name": "get_time"' in block and '"maxLength": 10' in block
    assert "[AVAILABLE_TOOLS]" not in prompt_of(server, {"messages": ASK, "tools": TOOLS, "tool_choice": "none"})


def test_tool_turns_become_mistral_call_and_result_turns(server: RunningServer) -> None:
    openai_id = "call_Xq81ZpLm0aTT0vNoKd"
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": openai_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": openai_id, "content": "18 C, sunny"},
    ]
    prompt = prompt_of(server, {"messages": messages, "tools": TOOLS})
    mapped = mistral_call_id(openai_id)
    assert f'[TOOL_CALLS]get_weather[CALL_ID]{mapped}[ARGS]{{"city": "Paris", "unit": "C"}}</s>' in prompt
    assert f"[TOOL_RESULTS]{mapped}[TOOL_CONTENT]18 C, sunny[/TOOL_RESULTS]" in prompt


def test_a_conversation_with_tool_results_is_answered(client: Any) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
        {"role": "user", "content": "Thanks! And the weather?"},
    ]
    r = create(client, messages=messages, tools=TOOLS, max_tokens=4)
    assert r.choices[0].finish_reason in {"length", "stop", "tool_calls"}


# -- forced calls ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_named_tool_choice_always_calls_that_function(client: Any, seed: int) -> None:
    r = create(client, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=seed)
    calls = assert_valid_calls(r.choices[0], {"get_time"}, most=1)
    assert r.choices[0].message.content is None and calls[0].function.name == "get_time"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_calls_one_or_more_allowed_functions(client: Any, seed: int) -> None:
    r = create(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed)
    assert_valid_calls(r.choices[0], set(SCHEMAS))
    single = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
    assert_valid_calls(single.choices[0], set(SCHEMAS), most=1)


@pytest.mark.parametrize("seed", range(6))
def test_auto_lets_the_model_decide_and_a_started_call_is_well_formed(client: Any, seed: int) -> None:
    r = create(client, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=60)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert_valid_calls(choice, set(SCHEMAS))
    else:
        assert choice.finish_reason in {"stop", "length"} and isinstance(choice.message.content, str)


def test_max_tokens_below_the_shortest_forced_call_is_a_400_that_states_the_minimum(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match=r"at least (\d+) tokens") as refused:
        create(client, tools=TOOLS, tool_choice=NAMED, max_tokens=4)
    minimum = int(re.search(r"at least (\d+) tokens", str(refused.value)).group(1))  # type: ignore[union-attr]
    assert refused.value.body["param"] == "max_tokens"  # type: ignore[index]
    r = create(client, tools=TOOLS, tool_choice=NAMED, max_tokens=minimum, temperature=1.0, seed=3)
    assert_valid_calls(r.choices[0], {"get_time"}, most=1)


# -- streaming -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_streamed_tool_calls_match_the_unstreamed_ones(client: Any, choice: Any) -> None:
    whole = create(client, tools=TOOLS, tool_choice=choice, temperature=0)
    stream = create(client, tools=TOOLS, tool_choice=choice, temperature=0, stream=True)
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    expected = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in whole.choices[0].message.tool_calls
    ]
    assert streamed_calls(chunks) == expected  # v11: the model writes the call id, so even ids agree
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks)


def test_a_streamed_forced_call_opens_with_id_and_name_then_streams_its_arguments(client: Any) -> None:
    chunks = list(create(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    first = deltas[0]
    assert first.index == 0 and CALL_ID.match(first.id) and first.type == "function"
    assert first.function.name in SCHEMAS and first.function.arguments == ""
    assert len(deltas) > 2, "arguments arrive in fragments, not in one piece"
    assert all(d.id is None and d.function.name is None for d in deltas if d.index == first.index and d is not first)
    indexes = [d.index for d in deltas]
    assert indexes == sorted(indexes)  # parallel calls one after the other, increasing index
    assert not any(c.choices[0].delta.content for c in chunks)


# -- JSON output -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_content_validates(client: Any, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    r = create(client, response_format=fmt, temperature=1.0, seed=seed)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)


def test_json_object_content_is_an_object(client: Any) -> None:
    """Any object: the random model writes long keys, so a seed where it ends early keeps the test quick."""
    messages = [{"role": "user", "content": "Give me JSON."}]
    r = create(
        client, messages=messages, response_format={"type": "json_object"}, temperature=1.0, seed=34, max_tokens=120
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


# -- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
            "tools",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"messages": [*ASK, {"role": "tool", "content": "12:00"}]}, "messages"),
        ({"messages": [{"role": "tool", "tool_call_id": "abcdefghi", "content": "x"}]}, "messages"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 17}, "n"),
        ({"tools": TOOLS, "tool_choice": "required", "max_tokens": 2}, "max_tokens"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}}, "max_tokens"),
    ],
)
def test_bad_tool_and_format_requests_are_400(http: Any, extra: dict[str, Any], param: str) -> None:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4, **extra}
    for stream in (False, True):
        error = assert_openai_error(http.post("/v1/chat/completions", json={**body, "stream": stream}), 400)
        assert error["param"] and error["param"].startswith(param), error


def test_sdk_sees_a_bad_request_error(client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


# -- other tokenizer versions -------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["v7", "v13"])
def versioned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path: Path = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), tokenizer_version=request.param)
    loaded = load_model(Settings(model=str(path), cache_dir=path.parent))
    with serve(loaded, path.parent) as running:
        yield running.client()


def test_forced_and_streamed_calls_in_every_syntax(versioned: Any) -> None:
    for seed in range(3):
        r = create(versioned, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed)
        assert_valid_calls(r.choices[0], set(SCHEMAS))
    chunks = list(create(versioned, tools=TOOLS, tool_choice=NAMED, temperature=0, stream=True))
    (call,) = streamed_calls(chunks)
    assert call["name"] == "get_time" and CALL_ID.match(call["id"])
    jsonschema.validate(json.loads(call["arguments"]), CLOCK)
