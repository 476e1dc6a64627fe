"""Tool calls parsed from token ids (v7, v11, v13), call ids, and what a generation means to the client.

The helpers build tokenizers of every tool-call syntax from the tiny tekken; other chat tests import them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from app.model.text.callstream import ChatOutput, chat_output
from app.model.text.toolcalls import mistral_call_id, new_call_id, parse_calls
from app.types import ParsedCall
from tests.support.tekken_vocab import VERSIONS, instruct, text_ids, vocab

_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


def encode_calls(version: str, calls: list[tuple[str, dict[str, Any], str]]) -> list[int]:
    """[TOOL_CALLS]... exactly as mistral-common renders an assistant turn with these (name, args, id) calls."""
    from mistral_common.protocol.instruct.messages import AssistantMessage
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    message = AssistantMessage(
        tool_calls=[
            ToolCall(id=call_id, function=FunctionCall(name=name, arguments=json.dumps(args)))
            for name, args, call_id in calls
        ]
    )
    return list(instruct(version)._encode_tool_calls_in_assistant_message(message))


# -- parsing -------------------------------------------------------------------------------------------
WEATHER = ("get_weather", {"city": "Paris", "days": 3}, "abcDEF123")
NOOP = ("noop", {}, "xyz987XYZ")
NAMES = frozenset({"get_weather", "noop"})


@pytest.mark.parametrize("version", VERSIONS)
def test_parallel_calls_round_trip_through_mistral_commons_rendering(version: str) -> None:
    calls = parse_calls(encode_calls(version, [WEATHER, NOOP]), vocab(version), NAMES)
    assert calls is not None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(WEATHER[0], WEATHER[1]), (NOOP[0], NOOP[1])]
    assert all(_CALL_ID.match(c.id) for c in calls)
    if version != "v13":  # v13 writes no call ids: fresh ones are made
        assert [c.id for c in calls] == [WEATHER[2], NOOP[2]]


def test_hand_built_v11_ids_with_and_without_call_id() -> None:
    v = vocab("v11")
    assert (v.tool_calls_id, v.args_id, v.call_id_id, v.eos_id) == (9, 32, 33, 2)
    ids = [9, *text_ids("v11", "get_weather"), 33, *text_ids("v11", "a1b2c3d4e"), 32]
    ids += [*text_ids("v11", '{"city": "Oslo"}'), 9, *text_ids("v11", "noop"), 32, *text_ids("v11", "{}")]
    calls = parse_calls(ids, v, NAMES)
    assert calls == [ParsedCall("get_weather", '{"city": "Oslo"}', "a1b2c3d4e"), ParsedCall("noop", "{}", calls[1].id)]


def test_hand_built_v13_and_v7() -> None:
    v13 = [9, *text_ids("v13", "noop"), 32, *text_ids("v13", ' {"a": [1, 2]} ')]
    # the arguments as generated (so the streamed fragments join to them), not re-serialised
    assert [c.arguments for c in parse_calls(v13, vocab("v13")) or []] == [' {"a": [1, 2]} ']
    v7 = [9, *text_ids("v7", '[{"name": "noop", "arguments": {}}, {"name": "get_weather", "arguments": "{}"}]')]
    assert [c.name for c in parse_calls(v7, vocab("v7"), NAMES) or []] == ["noop", "get_weather"]


@pytest.mark.parametrize(
    ("version", "text_after_marker"),
    [
        ("v11", "get_weather"),  # no [ARGS]
        ("v11", "get_weather[ARGS]{not json"),
        ("v11", "get_weather[ARGS][1, 2]"),  # arguments must be an object
        ("v11", "get_weather[ARGS]{} trailing"),
        ("v11", "unknown_fn[ARGS]{}"),
        ("v11", "bad name![ARGS]{}"),
        ("v11", "get_weather[ARGS]{}[ARGS]{}"),
        ("v11", 'get_weather[ARGS]{"x": NaN}'),
        ("v13", "[ARGS]{}"),
        ("v7", '{"name": "get_weather"'),
        ("v7", '[{"arguments": {}}]'),
        ("v7", '[{"name": "noop", "arguments": 3}]'),
        ("v7", "[]"),
    ],
)
def test_malformed_calls_are_not_calls_and_never_markup(version: str, text_after_marker: str) -> None:
    """Malformed: not `tool_calls`. v11/v13 calls are reported as generated (what the stream already sent),
    v7's unparsable JSON as text; either way without a control token in the content."""
    v = vocab(version)
    ids = [9]
    for i, piece in enumerate(text_after_marker.split("[ARGS]")):
        ids += ([32] if i else []) + text_ids(version, piece)
    assert parse_calls(ids, v, NAMES) is None
    output = chat_output(ids, "stop", v, NAMES, ())
    assert output.finish_reason == "stop"
    assert "[TOOL_CALLS]" not in (output.content or "") and "[ARGS]" not in (output.content or "")
    if version == "v7":
        assert output.calls == () and output.content == text_after_marker


def test_text_that_spells_the_marker_is_never_a_call() -> None:
    ids = text_ids("v11", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}')
    assert 9 not in ids and 32 not in ids
    output = chat_output(ids, "stop", vocab("v11"), NAMES, ())
    assert output == ChatOutput('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', (), "stop")


def test_chat_output_rules() -> None:
    v = vocab("v11")
    call = encode_calls("v11", [WEATHER])
    before = text_ids("v11", "Let me check. ")
    out = chat_output(before + call, "stop", v, NAMES, ())
    assert out.content == "Let me check. " and out.finish_reason == "tool_calls" and out.calls[0].name == "get_weather"
    assert chat_output(call, "stop", v, NAMES, ()).content is None
    cut = chat_output(call[:-2], "length", v, NAMES, ())  # max_tokens cut the call short: OpenAI's way
    (partial,) = cut.calls
    assert cut.finish_reason == "length" and cut.content is None
    assert (partial.name, partial.id) == ("get_weather", "abcDEF123")
    assert json.dumps(WEATHER[1]).startswith(partial.arguments) and partial.arguments != json.dumps(WEATHER[1])
    off = chat_output(call, "stop", v, None, ())  # tools off: markers erased, as plain decoding does
    assert off.calls == () and off.content == v.text(call)
    stopped = chat_output(call, "stop", v, NAMES, ("Par",))  # a stop string ended it, not the model
    assert stopped.finish_reason == "stop" and stopped.calls and stopped.content is None


def test_unstreamed_arguments_are_the_generated_text_and_equal_the_streamed_fragments() -> None:
    from app.model.text.callstream import CallReader

    v = vocab("v11")
    ids = encode_calls("v11", [WEATHER, NOOP])
    whole = chat_output(ids, "stop", v, NAMES, ())
    reader = CallReader(v)
    deltas = [d for t in ids for d in reader.push([t])] + reader.finish()
    joined: dict[int, str] = {}
    for d in deltas:
        joined[d.index] = joined.get(d.index, "") + d.arguments
    assert [joined[i] for i in sorted(joined)] == [c.arguments for c in whole.calls]
    assert whole.calls[0].arguments == v.text(ids[ids.index(32) + 1 : ids.index(9, 1)])  # the text itself


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2999), max_size=60), st.sampled_from(VERSIONS), st.sampled_from(["stop", "length"]))
def test_random_ids_never_crash_and_need_the_marker(ids: list[int], version: str, finish: str) -> None:
    v = vocab(version)
    calls = parse_calls(ids, v, None)
    output = chat_output(ids, finish, v, NAMES, ("zz",))
    if v.tool_calls_id not in ids:
        assert calls is None and output.calls == ()
    assert output.calls == () or output.finish_reason == "tool_calls"


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80), st.sampled_from(VERSIONS))
def test_random_text_is_never_a_call(text: str, version: str) -> None:
    ids = text_ids(version, text)
    assert chat_output(ids, "stop", vocab(version), NAMES, ()).calls == ()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_FN_NAME = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]{0,20}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(VERSIONS),
    st.lists(st.tuples(_FN_NAME, st.dictionaries(st.text(max_size=8), _JSON, max_size=4)), min_size=1, max_size=3),
)
def test_any_rendered_calls_parse_back(version: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    ids = encode_calls(version, [(name, args, "abcdefghi") for name, args in calls])
    parsed = parse_calls(ids, vocab(version))
    assert parsed is not None
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls


# -- call ids ------------------------------------------------------------------------------------------
def test_openai_ids_map_to_stable_mistral_ids() -> None:
    openai_id = "call_8sFNr6vOd0TR3lq5bkBQzGIA"
    mapped = mistral_call_id(openai_id)
    assert _CALL_ID.match(mapped) and mapped == mistral_call_id(openai_id)
    assert mistral_call_id("abcDEF123") == "abcDEF123"  # already Mistral's shape: kept
    assert mistral_call_id("call_1") != mistral_call_id("call_2")
    assert _CALL_ID.match(new_call_id()) and new_call_id() != new_call_id()


@given(st.text(max_size=40))
def test_every_id_maps_to_nine_alphanumerics(openai_id: str) -> None:
    assert _CALL_ID.match(mistral_call_id(openai_id))


# -- vocab ---------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2999), max_size=40))
def test_vocab_text_is_the_tokenizers_decoding(ids: list[int]) -> None:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    tekken = instruct("v11").tokenizer
    expected = tekken.decode(ids, SpecialTokenPolicy.IGNORE)
    # Where tekken leaves replacement characters, our byte-level join may complete a character across tokens.
    assume("\ufffd" not in expected)
    assert vocab("v11").text(ids) == expected
    assert vocab("v11").text(ids, keep_special=True) == tekken.decode(ids, SpecialTokenPolicy.KEEP)
