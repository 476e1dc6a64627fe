"""At the real 131,072-token vocabulary: batched sampling keeps seeded answers the same alone and in a batch,
forced tool calls and JSON stay valid, and the sampler picks only what a grammar allows, through the server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from app.model.compute.loader import LoadedModel
from tests.support.server import serve

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["C", "F"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["unit", "days"],
        },
    },
}


def chat(http: httpx.Client, model: str, **body: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me something."}], **body}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_the_model_has_the_real_vocabulary(full_vocab: LoadedModel) -> None:
    assert full_vocab.model.config.text_config.vocab_size == 131_072
    assert len(full_vocab.processor.tokenizer) == 131_072


def test_seeded_default_sampling_is_the_same_alone_and_in_a_batch(full_vocab: LoadedModel, tiny_dir: Path) -> None:
    bodies = [{"seed": seed, "max_tokens": 12} for seed in range(8)] + [{"max_tokens": 12, "top_k": 5}] * 4
    with serve(full_vocab, tiny_dir, max_batch_size=16, max_wait_ms=50) as server, server.http() as http:
        model = server.context.settings.model_id
        alone = [chat(http, model, **b)["choices"][0]["message"]["content"] for b in bodies[:8]]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda b: chat(http, model, **b), bodies))
        steps = {s.name: s.value for s in server.context.metrics.batch_size.collect()[0].samples}
    assert [t["choices"][0]["message"]["content"] for t in together[:8]] == alone
    assert len(set(alone)) > 4  # different seeds draw different answers: the test is not blind
    assert steps["voxtral_batch_size_sum"] / steps["voxtral_batch_size_count"] > 1.5  # rows really shared steps


def test_forced_calls_and_json_are_valid_at_the_real_vocabulary(full_vocab: LoadedModel, tiny_dir: Path) -> None:
    with serve(full_vocab, tiny_dir) as server, server.http() as http:
        model = server.context.settings.model_id
        with ThreadPoolExecutor(6) as pool:
            calls = list(
                pool.map(
                    lambda seed: chat(http, model, tools=[WEATHER], tool_choice="required", seed=seed, max_tokens=60),
                    range(6),
                )
            )
    for answer in calls:
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "get_weather"
        assert arguments["unit"] in {"C", "F"} and 1 <= arguments["days"] <= 9
