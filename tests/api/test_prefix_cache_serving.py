"""Prefix caching as clients see it, through the real app and the `openai` client: `cached_tokens` in usage,
`cache_salt`, `--no-enable-prefix-caching`, and vLLM's counters on /metrics.

Each test sends prompts no other test sent (a fresh nonce first), so what it finds cached it cached itself.
Greedy answers are compared between a server with the cache and one without: the cache changes what is
prefilled, never what comes out."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.audio import encode_wav_float32
from app.model.compute.loader import LoadedModel
from tests.support.audio_fixtures import JFK
from tests.support.server import RunningServer, serve

SENTENCE = "the speaker asks about the weather in Paris and the time of the next train to Lyon"


@pytest.fixture(scope="module")
def uncached(loaded: LoadedModel, tiny_dir: Path) -> Iterator[RunningServer]:
    with serve(loaded, tiny_dir, max_batch_size=16, enable_prefix_caching=False) as running:
        yield running


def fresh_text(words: int = 60) -> str:
    """A prompt no other request sent: a nonce, then ordinary words (several 16-token blocks)."""
    pool = SENTENCE.split()
    return uuid.uuid4().hex + " " + " ".join(pool[i % len(pool)] for i in range(words))


def ask(client: Any, content: Any, **extra: Any) -> Any:
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, **extra)


def cached(answer: Any) -> int:
    return int(answer.usage.prompt_tokens_details.cached_tokens)


def prefix_counts(http: httpx.Client) -> tuple[float, float]:
    """(queries, hits): vLLM's `vllm:prefix_cache_{queries,hits}_total`, labelled as vLLM labels them."""
    found = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
                assert sample.labels == {"model_name": "tiny", "engine": "0"}
                found[sample.name] = sample.value
    return found["vllm:prefix_cache_queries_total"], found["vllm:prefix_cache_hits_total"]


def test_a_repeated_prompt_is_served_from_the_cache_with_the_same_answer(client: Any, uncached: Any) -> None:
    text = fresh_text()
    first, again = ask(client, text), ask(client, text)
    assert cached(first) == 0
    assert 0 < cached(again) < again.usage.prompt_tokens  # the last prompt token is computed: it gives the logits
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    plain = ask(uncached.client(), text)
    assert plain.choices[0].message.content == first.choices[0].message.content


def test_without_the_cache_nothing_is_cached(uncached: Any) -> None:
    client, text = uncached.client(), fresh_text()
    assert [cached(ask(client, text)) for _ in range(2)] == [0, 0]


def test_a_conversation_about_a_recording_reuses_its_audio_turn(client: Any, uncached: Any) -> None:
    """The second turn resends the first (its audio included): its prefix, audio tokens too, comes from the
    cache, and its answer is the one a server without the cache gives."""
    clip = encode_wav_float32((JFK[: 16000 * 5] * 0.7).astype("float32"))
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": "wav"}}
    turn = [part, {"type": "text", "text": fresh_text(8)}]
    first = ask(client, turn)
    messages = [
        {"role": "user", "content": turn},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    follow = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert cached(follow) >= first.usage.prompt_tokens - 16  # all but the first turn's last, partial block
    plain = uncached.client().chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert (cached(plain), plain.choices[0].message.content) == (0, follow.choices[0].message.content)


def test_a_salt_keeps_its_prefixes_to_itself(client: Any) -> None:
    text = fresh_text()
    salted = [ask(client, text, extra_body={"cache_salt": "tenant-a"}) for _ in range(2)]
    assert cached(salted[0]) == 0 and cached(salted[1]) > 0
    assert cached(ask(client, text, extra_body={"cache_salt": "tenant-b"})) == 0
    assert cached(ask(client, text)) == 0  # the unsalted pool never saw it either
    assert len({a.choices[0].message.content for a in salted}) == 1


@pytest.mark.parametrize("salt", ["", 7, ["a"]])
def test_a_salt_must_be_a_non_empty_string(client: Any, salt: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "Hello", extra_body={"cache_salt": salt})
    assert "cache_salt" in str(caught.value)


def test_the_streamed_usage_chunk_and_n_choices_count_the_prompt_once(client: Any) -> None:
    text = fresh_text()
    whole = ask(client, text)
    chunks = list(ask(client, text, n=2, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_responses_report_cached_input_tokens_and_take_a_salt(client: Any) -> None:
    text = fresh_text()
    first, again = (client.responses.create(model="tiny", input=text, store=False) for _ in range(2))
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert 0 < again.usage.input_tokens_details.cached_tokens < again.usage.input_tokens
    other = client.responses.create(model="tiny", input=text, store=False, extra_body={"cache_salt": "tenant-c"})
    assert other.usage.input_tokens_details.cached_tokens == 0


def test_the_counters_are_the_prompt_tokens_looked_up_and_found(client: Any, http: httpx.Client) -> None:
    text = fresh_text()
    before = prefix_counts(http)
    answers = [ask(client, text) for _ in range(2)]
    queries, hits = (after - b for after, b in zip(prefix_counts(http), before, strict=True))
    assert queries == sum(a.usage.prompt_tokens for a in answers)
    assert hits == sum(cached(a) for a in answers) > 0


def test_without_the_cache_the_counters_stand_still(uncached: Any) -> None:
    with uncached.http() as http:
        before = prefix_counts(http)
        ask(uncached.client(), fresh_text())
        assert prefix_counts(http)[1] == before[1]
