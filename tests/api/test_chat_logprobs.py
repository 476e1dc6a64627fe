"""Log-probs (the model's own distribution, in OpenAI's shapes) and `n` choices from one prefill, through the
sampler, the engine and the openai SDK; every body and chunk held to OpenAI's published schemas."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch

from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator, Row
from app.model.compute.loader import LoadedModel
from app.model.compute.sampling import Sampler
from app.model.text.prompts import Prompter
from app.types import Sampled, SamplingParams
from tests.support.openapi_spec import check, load_spec
from tests.support.server import RunningServer

ASK = [{"role": "user", "content": "Say something."}]
LOGPROB_TOL = 2e-4
"""float32 log-probs of a batched, cached decode against one uncached forward pass of the same prefix: the
attention sums run in another order (1e-5 seen on the tiny model); a wrong row or position is off by > 0.1."""


def create(client: Any, **kw: Any) -> Any:
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model="tiny", **kw)


# -- the numbers -----------------------------------------------------------------------------------------
def test_logprobs_are_the_log_softmax_of_the_models_logits_for_the_same_prefix(loaded: LoadedModel) -> None:
    """Whatever the sampling settings (penalties, temperature, truncation), the log-probs are those of
    `model.forward`'s raw logits: one uncached forward pass over prompt + generated tokens is the oracle."""
    prompt = Prompter(loaded.processor, "tiny").chat(ASK).input_ids
    gen = BatchGenerator(loaded.model, pad_token_id=11, log_mel=LogMel(loaded.processor.feature_extractor, 3000))
    settings = [
        SamplingParams(logprobs=5),
        SamplingParams(temperature=0.7, top_p=0.8, top_k=40, seed=1, logprobs=3, presence_penalty=1.5),
        SamplingParams(temperature=1.0, seed=2),  # asks for none: gets none
        SamplingParams(temperature=0.3, seed=3, logprobs=0, frequency_penalty=2.0),
    ]
    rows = [Row(prompt[: len(prompt) - i], [], s) for i, s in enumerate(settings)]
    sampler, state, logits = Sampler(), *gen.prefill(rows)
    found: list[list[Sampled]] = [[] for _ in rows]
    for _ in range(6):
        step = sampler.step(logits, rows)
        for row, got, out in zip(rows, step, found, strict=True):
            assert isinstance(got, Sampled)
            row.generated.append(got.token)
            out.append(got)
        logits = gen.step(state, torch.tensor([s.token for s in step]))  # type: ignore[union-attr]
    for row, out in zip(rows, found, strict=True):
        asked = row.sampling.logprobs
        if asked is None:
            assert all(s.logprob is None for s in out)
            continue
        ids = torch.tensor([row.input_ids + row.generated[:-1]])
        with torch.inference_mode():
            reference = torch.log_softmax(loaded.model(input_ids=ids).logits[0, -len(out) :].float(), dim=-1)
        for position, sampled in enumerate(out):
            lp = sampled.logprob
            assert lp is not None and lp.token == sampled.token and len(lp.top) == asked
            assert abs(lp.logprob - float(reference[position, sampled.token])) < LOGPROB_TOL
            expected = reference[position].topk(asked).values.tolist() if asked else []
            assert [v for _, v in lp.top] == pytest.approx(expected, abs=LOGPROB_TOL)
            for token, value in lp.top:
                assert abs(value - float(reference[position, token])) < LOGPROB_TOL


# -- chat, through the SDK ---------------------------------------------------------------------------------
def test_chat_logprobs_in_openai_shape_and_conform(client: Any, http: httpx.Client) -> None:
    r = create(client, logprobs=True, top_logprobs=4, temperature=1.0, seed=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 4 and isinstance(entry.bytes, list)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob <= values[0] + 1e-6
    body = {"model": "tiny", "messages": ASK, "max_tokens": 6, "logprobs": True, "top_logprobs": 2, "n": 2}
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    check(load_spec(), "CreateChatCompletionResponse", answer.json())
    no = create(client)
    assert no.choices[0].logprobs is None


def test_greedy_logprobs_top_alternative_is_the_chosen_token(client: Any) -> None:
    r = create(client, logprobs=True, top_logprobs=1, temperature=0)
    for entry in r.choices[0].logprobs.content:
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob


def test_streamed_logprobs_cover_every_token_once_and_equal_the_unstreamed(client: Any, http: httpx.Client) -> None:
    whole = create(client, logprobs=True, top_logprobs=2, temperature=1.0, seed=9, max_tokens=10)
    chunks = list(create(client, logprobs=True, top_logprobs=2, temperature=1.0, seed=9, max_tokens=10, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    body = {"model": "tiny", "messages": ASK, "max_tokens": 6, "logprobs": True, "stream": True, "n": 2}
    spec = load_spec()
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        check(spec, "CreateChatCompletionStreamResponse", json.loads(event))


def test_tool_call_turns_carry_logprobs(client: Any) -> None:
    from tests.support.tool_fixtures import TOOLS

    r = create(client, tools=TOOLS, tool_choice="required", logprobs=True, temperature=1.0, seed=1, max_tokens=60)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    tokens = [e.token for e in r.choices[0].logprobs.content]
    assert tokens[0] == "[TOOL_CALLS]" and len(tokens) == r.usage.completion_tokens


# -- n -----------------------------------------------------------------------------------------------------
def test_n_choices_share_one_prompt_and_draw_with_seed_plus_index(client: Any, server: RunningServer) -> None:
    prompts_before = _prompt_tokens(server)
    r = create(client, n=4, temperature=1.0, seed=10, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert _prompt_tokens(server) - prompts_before == r.usage.prompt_tokens  # prefilled once, not four times
    single = create(client, temperature=1.0, seed=10, max_tokens=8)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    assert r.usage.completion_tokens == 4 * 8 == sum(8 for _ in r.choices)
    assert r.choices[0].message.content == single.choices[0].message.content  # choice 0 draws with seed
    assert create(client, temperature=1.0, seed=13, max_tokens=8).choices[0].message.content == (
        r.choices[3].message.content  # choice i with seed + i
    )
    assert len({c.message.content for c in r.choices}) > 2


def _prompt_tokens(server: RunningServer) -> float:
    return float(server.context.metrics.prompt_tokens._value.get())


def test_n_streams_interleave_by_index(client: Any) -> None:
    whole = create(client, n=3, temperature=1.0, seed=20, max_tokens=6)
    chunks = list(create(client, n=3, temperature=1.0, seed=20, max_tokens=6, stream=True))
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert finishes == {i: c.finish_reason for i, c in enumerate(whole.choices)}
    order = [c.choices[0].index for c in chunks if c.choices[0].delta.content]
    assert order != sorted(order), "choices decode together, so their chunks interleave"


def test_n_with_forced_calls_gives_every_choice_a_valid_call(client: Any) -> None:
    from tests.support.tool_fixtures import SCHEMAS, TOOLS, assert_valid_calls

    r = create(client, n=3, tools=TOOLS, tool_choice="required", temperature=1.0, seed=2, max_tokens=40)
    for choice in r.choices:
        assert_valid_calls(choice, set(SCHEMAS))
