"""Forced output always completes: with tool_choice required or named, and with response_format json_schema,
a random model (whose strings never end by themselves) still writes a complete, schema-valid call or object
at every max_tokens from the stated minimum up, streamed or not; below the minimum, a 400 that states it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from app.model.compute.loader import LoadedModel
from tests.support.server import serve
from tests.support.tool_fixtures import CLOCK, NAMED, SCHEMAS, TOOLS, WEATHER, assert_valid_calls, streamed_calls

FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
OPEN_TEXT = {"type": "object", "properties": {"note": {"type": "string"}, "tags": {"type": "array"}}}
"""No maxLength, no required keys: only the closing walk ends its string on random weights."""
CASES: dict[str, dict[str, Any]] = {
    "named": {"tools": TOOLS, "tool_choice": NAMED},
    "required": {"tools": TOOLS, "tool_choice": "required"},
    "json_schema": {"response_format": FORMAT},
    "open_text": {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": OPEN_TEXT}}},
    "json_object": {"response_format": {"type": "json_object"}},
    "open_tool": {
        "tools": [
            {"type": "function", "function": {"name": "note", "parameters": {**OPEN_TEXT, "required": ["note"]}}}
        ],
        "tool_choice": "required",
    },
}


def minimum(client: Any, case: dict[str, Any]) -> int:
    with pytest.raises(openai.BadRequestError, match=r"at least \d+ tokens") as refused:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Go."}], max_tokens=1, **case
        )
    return int(re.search(r"at least (\d+) tokens", str(refused.value)).group(1))  # type: ignore[union-attr]


def assert_complete(name: str, choice: Any, content: str | None, calls: list[dict[str, Any]]) -> None:
    if name in {"json_schema", "open_text", "json_object"}:
        assert choice.finish_reason == "stop", choice
        schema = {"json_schema": WEATHER, "open_text": OPEN_TEXT}.get(name, {"type": "object"})
        jsonschema.validate(json.loads(content or ""), schema)
        return
    assert choice.finish_reason == "tool_calls" and calls, choice
    schemas = {**SCHEMAS, "note": {**OPEN_TEXT, "required": ["note"]}}
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
    if name == "named":
        assert [c["name"] for c in calls] == ["get_time"]


@pytest.mark.parametrize("name", list(CASES))
def test_forced_output_completes_at_every_small_max_tokens(client: Any, name: str) -> None:
    case = CASES[name]
    least = minimum(client, case)
    assert least >= 3  # "{", "}", EOS at the least
    for extra in (0, 1, 3, 8):
        for seed in range(2):
            kw = {"model": "tiny", "messages": [{"role": "user", "content": "Go."}], "temperature": 1.0, "seed": seed}
            r = client.chat.completions.create(max_tokens=least + extra, **kw, **case)
            choice = r.choices[0]
            calls = [
                {"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls or []
            ]
            assert_complete(name, choice, choice.message.content, calls)
            assert r.usage.completion_tokens <= least + extra
            chunks = list(client.chat.completions.create(max_tokens=least + extra, stream=True, **kw, **case))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            (finish,) = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
            streamed = streamed_calls(chunks)
            assert_complete(name, finish, text, [{"name": c["name"], "arguments": c["arguments"]} for c in streamed])
            assert [{"name": c["name"], "arguments": c["arguments"]} for c in streamed] == calls  # same seed
            assert text == (choice.message.content or "")


def test_a_named_call_is_valid_at_its_minimum(client: Any) -> None:
    least = minimum(client, CASES["named"])
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Go."}],
        max_tokens=least,
        temperature=1.0,
        seed=7,
        **CASES["named"],
    )
    (call,) = assert_valid_calls(r.choices[0], {"get_time"}, most=1)
    jsonschema.validate(json.loads(call.function.arguments), CLOCK)


def test_forced_output_completes_at_the_real_vocabulary(full_vocab: LoadedModel, tiny_dir: Path) -> None:
    with serve(full_vocab, tiny_dir) as server:
        client = server.client()
        model = server.context.settings.model_id
        for name in ("required", "open_text"):
            case = CASES[name]
            with pytest.raises(openai.BadRequestError, match=r"at least (\d+) tokens") as refused:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Go."}], max_tokens=1, **case
                )
            least = int(re.search(r"at least (\d+) tokens", str(refused.value)).group(1))  # type: ignore[union-attr]
            for extra, stream in ((0, False), (4, True), (12, False)):
                kw = {
                    "model": model,
                    "messages": [{"role": "user", "content": "Go."}],
                    "temperature": 1.0,
                    "seed": extra,
                }
                if stream:
                    chunks = list(client.chat.completions.create(max_tokens=least + extra, stream=True, **kw, **case))
                    (finish,) = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    calls = [{"name": c["name"], "arguments": c["arguments"]} for c in streamed_calls(chunks)]
                    assert_complete(name, finish, text, calls)
                else:
                    choice = client.chat.completions.create(max_tokens=least + extra, **kw, **case).choices[0]
                    calls = [
                        {"name": c.function.name, "arguments": c.function.arguments}
                        for c in choice.message.tool_calls or []
                    ]
                    assert_complete(name, choice, choice.message.content, calls)
