"""`--tensor-parallel-size 2` on a CPU (gloo): real server processes, the same answers as one rank, and a lost
rank stops the server.

Two `voxtral-server serve` processes on the tiny model, one with one rank and one with two, answer the same
requests (text, audio, a grammar, seeded sampling with n=2, whose second choice is a slot copy): the same text
and token counts. The sharded decoder sums its partial products in another order than one matrix multiply, so
its logits differ in the last bits; on this model's answers no greedy or seeded choice is that close.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from app.model.compute.loader import LoadedModel
from tests.support.server import AUDIO, free_port

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 60.0


class Process:
    def __init__(self, ranks: int, tiny_dir: Path, log: Path) -> None:
        self.port, self.log = free_port(), log
        args = ["--model", "tiny", "--port", str(self.port), "--cache-dir", str(tiny_dir), "--max-batch-size", "4"]
        args += ["--tensor-parallel-size", str(ranks), "--context-length", "2048"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.main", "serve", *args], cwd=ROOT, stdout=out, stderr=out
            )
        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", timeout=120, max_retries=0)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("never ready:\n" + self.log.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def servers(loaded: LoadedModel, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Process]]:
    """One rank and two ranks, started together."""
    logs = tmp_path_factory.mktemp("tp")
    started = [Process(ranks, tiny_dir, logs / f"tp{ranks}.log") for ranks in (1, 2)]
    try:
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.close()


def text_chat(client: OpenAI) -> Any:
    messages = [{"role": "user", "content": "Name three colours."}]
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]


def audio_transcription(client: OpenAI) -> Any:
    with open(AUDIO / "jfk.wav", "rb") as audio:
        return client.audio.transcriptions.create(model="tiny", file=audio, temperature=0)


def grammar_row(client: OpenAI) -> Any:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "A name, as JSON."}],
        max_tokens=24,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "who", "schema": schema}},
    )


def seeded_rows(client: OpenAI) -> Any:
    messages = [{"role": "user", "content": "Say something."}]
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=1.0, seed=7, n=2)  # type: ignore[arg-type]


def answer(response: Any) -> Any:
    """What must be equal: the texts and the tokens counted."""
    if hasattr(response, "choices"):
        return [(c.message.content, c.finish_reason) for c in response.choices], response.usage.completion_tokens
    return response.text


@pytest.mark.parametrize("request_of", [text_chat, audio_transcription, grammar_row, seeded_rows])
def test_two_ranks_answer_as_one(servers: list[Process], request_of: Any) -> None:
    one, two = (answer(request_of(server.client)) for server in servers)
    assert two == one


def test_a_lost_rank_stops_the_server_saying_which(servers: list[Process]) -> None:
    two = servers[1]
    pid = int(re.findall(r"tensor-parallel rank 1 started \(pid (\d+)\)", two.log.read_text())[0])
    subprocess.run(["kill", "-9", str(pid)], check=True)
    code = two.proc.wait(STOP_WITHIN_S)
    assert code != 0
    assert "tensor-parallel rank 1 exited with code -9: stopping the server" in two.log.read_text()
