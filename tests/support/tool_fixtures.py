"""Tools, their argument schemas, and checks of the calls a chat answer makes with them."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
}
CLOCK = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "JST"]}}, "required": ["tz"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
NAMED = {"type": "function", "function": {"name": "get_time"}}


def assert_valid_calls(choice: Any, names: set[str], most: int = 8) -> list[Any]:
    calls = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and calls and 1 <= len(calls) <= most, choice
    for call in calls:
        assert call.type == "function" and CALL_ID.match(call.id) and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return list(calls)


def streamed_calls(chunks: list[Any]) -> list[dict[str, Any]]:
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)]
