"""The OpenAI Agents SDK on its defaults: its default model (`OpenAIResponsesModel`, which calls
`POST /v1/responses`) runs agent turns against the server unchanged: structured output, a forced tool call,
and a streamed run."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
from agents import Agent, ModelSettings, RunConfig, Runner, function_tool
from agents.models.openai_provider import OpenAIProvider
from agents.models.openai_responses import OpenAIResponsesModel
from pydantic import BaseModel, Field

from tests.support.server import RunningServer


class City(BaseModel):
    city: str = Field(max_length=10)
    unit: str


@function_tool
def get_time(tz: str) -> str:
    """The time now in a time zone."""
    return f"12:00 {tz}"


def run_config(server: RunningServer) -> RunConfig:
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="test", max_retries=0)
    return RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)


def test_the_default_model_is_the_responses_model(server: RunningServer) -> None:
    provider = run_config(server).model_provider
    assert isinstance(provider.get_model("tiny"), OpenAIResponsesModel)


def test_structured_output(server: RunningServer) -> None:
    agent = Agent(
        name="a",
        instructions="Name a city.",
        model="tiny",
        output_type=City,
        model_settings=ModelSettings(max_tokens=60),
    )
    result = asyncio.run(Runner.run(agent, "A city, please.", run_config=run_config(server)))
    assert isinstance(result.final_output, City)


def test_a_tool_call_turn(server: RunningServer) -> None:
    agent = Agent(
        name="a",
        model="tiny",
        tools=[get_time],
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="get_time", max_tokens=100),
    )
    result = asyncio.run(Runner.run(agent, "What time is it?", run_config=run_config(server)))
    assert isinstance(result.final_output, str) and result.final_output.startswith("12:00")


def test_a_streamed_run(server: RunningServer) -> None:
    agent = Agent(name="a", model="tiny", output_type=City, model_settings=ModelSettings(max_tokens=60))

    async def run() -> tuple[Any, list[str]]:
        streamed = Runner.run_streamed(agent, "A city, please.", run_config=run_config(server))
        kinds = [event.type async for event in streamed.stream_events()]
        return streamed.final_output, kinds

    final, kinds = asyncio.run(run())
    assert isinstance(final, City) and "raw_response_event" in kinds
