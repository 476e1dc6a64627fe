"""`--tensor-parallel-size 2` on a CPU (gloo): real server processes, the same answers as one rank, and a lost
rank stops the server: one that exits, and one that stops answering (SIGSTOP: hung, not dead) within the
server's --tensor-parallel-timeout-s, not the 10 minutes of a collective's loading timeout.

Two `voxtral-server serve` processes on the tiny model, one with one rank and one with two, answer the same
requests (text, audio, a grammar, seeded sampling with n=2, whose second choice is a slot copy, and a long prompt
repeated then followed up, which rank 0's prefix cache serves): the same text and token counts. The sharded
decoder sums its partial products in another order than one matrix multiply, so its logits differ in the last
bits; on this model's answers no greedy or seeded choice is that close.
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
import openai
import pytest
import torch
from openai import OpenAI

from app.model.compute.loader import LoadedModel
from app.model.tiny import build_tiny_realtime_model
from tests.support.server import AUDIO, free_port

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 60.0
TIMEOUT_S = 5
"""The hung-rank server's --tensor-parallel-timeout-s."""


class Process:
    def __init__(self, ranks: int, tiny_dir: Path, log: Path, *extra: str) -> None:
        self.port, self.log = free_port(), log
        args = ["--model", "tiny", "--port", str(self.port), "--cache-dir", str(tiny_dir), "--max-batch-size", "4"]
        args += ["--tensor-parallel-size", str(ranks), "--context-length", "2048", *extra]
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


def repeated_prompt(client: OpenAI) -> Any:
    """The same long prompt twice, then a follow-up turn on it: the second and third prefill from the prefix
    cache on rank 0, and the followers repeat its slot reuse and copies (they keep no index of their own)."""
    story = " ".join(f"Line {i}: the river runs past the mill and the town." for i in range(24))
    turns = [{"role": "user", "content": story}]
    first = client.chat.completions.create(model="tiny", messages=turns, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    again = client.chat.completions.create(model="tiny", messages=turns, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    turns += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Why?"}]
    follow = client.chat.completions.create(model="tiny", messages=turns, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0 and follow.usage.prompt_tokens_details.cached_tokens > 0
    return [first, again, follow]


def answer(response: Any) -> Any:
    """What must be equal: the texts and the tokens counted."""
    if isinstance(response, list):
        return [answer(one) for one in response]
    if hasattr(response, "choices"):
        return [(c.message.content, c.finish_reason) for c in response.choices], response.usage.completion_tokens
    return response.text


@pytest.mark.parametrize("request_of", [text_chat, audio_transcription, grammar_row, seeded_rows, repeated_prompt])
def test_two_ranks_answer_as_one(servers: list[Process], request_of: Any) -> None:
    one, two = (answer(request_of(server.client)) for server in servers)
    assert two == one


def follower_pid(server: Process) -> int:
    return int(re.findall(r"tensor-parallel rank 1 started \(pid (\d+)\)", server.log.read_text())[0])


def test_a_lost_rank_stops_the_server_saying_which(servers: list[Process]) -> None:
    two = servers[1]
    pid = follower_pid(two)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    code = two.proc.wait(STOP_WITHIN_S)
    assert code != 0
    assert "tensor-parallel rank 1 exited with code -9: stopping the server" in two.log.read_text()


def test_a_rank_that_stops_answering_stops_the_server_within_its_timeout(
    loaded: LoadedModel, tiny_dir: Path, tmp_path: Path
) -> None:
    """A follower alive but silent (SIGSTOP): rank 0's all-reduce times out, then its wait for the answer, and
    the lifecycle fails: the request gets an error and the server exits non-zero, saying which rank."""
    server = Process(2, tiny_dir, tmp_path / "hung.log", "--tensor-parallel-timeout-s", str(TIMEOUT_S))
    pid = None
    try:
        server.wait_ready()
        pid = follower_pid(server)
        subprocess.run(["kill", "-STOP", str(pid)], check=True)
        with pytest.raises(openai.APIError):
            text_chat(server.client)
        code = server.proc.wait(STOP_WITHIN_S)
        assert code != 0
        log = server.log.read_text()
        assert f"rank 1 did not answer within {TIMEOUT_S} s" in log and "stopping the server" in log, log
    finally:
        if pid is not None:  # the server ends it; here only if the test failed first
            subprocess.run(["kill", "-9", str(pid)], check=False, capture_output=True)
        server.close()


@pytest.mark.parametrize("model", ["tiny-realtime", "built"])
def test_a_realtime_checkpoint_is_refused_before_loading(model: str, tmp_path: Path) -> None:
    """Voxtral Realtime streams in rank 0's own engine, which no follower repeats: refused in one line, exit 2,
    by name and by a checkpoint directory's model_type."""
    if model == "built":
        model = str(build_tiny_realtime_model(tmp_path / "realtime"))
    args = ["--model", model, "--tensor-parallel-size", "2", "--cache-dir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "app.main", "serve", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("voxtral-server:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "Voxtral Realtime" in lines[0] and "--tensor-parallel-size 1" in lines[0]


@pytest.mark.parametrize("kind", ["eager", "flash_attention_2"])
def test_a_realtime_checkpoint_with_another_attention_is_refused_before_loading(kind: str, tmp_path: Path) -> None:
    """Voxtral Realtime's rings are attended under a boolean mask that only sdpa reads as one (eager attention
    adds it; FlashAttention-2 takes a padding mask): any other --attn-implementation is refused in one line."""
    from app.config import Settings
    from app.model.compute.loader import ModelLoadError, preflight

    with pytest.raises(ModelLoadError, match="--attn-implementation sdpa"):
        preflight(Settings(model="tiny-realtime", attn_implementation=kind, cache_dir=tmp_path))
    preflight(Settings(model="tiny-realtime", cache_dir=tmp_path))  # sdpa, the default: no objection
    preflight(Settings(model="tiny", attn_implementation=kind, cache_dir=tmp_path))  # the text model: any kernel


def test_ranks_out_of_memory_alike_answer_alike() -> None:
    """An out-of-memory error names its rank's GPU and free bytes: ranks compare it by its type alone, so the
    same error everywhere splits the batch as on one GPU instead of stopping the server; others by message."""
    from app.model.compute.parallel import _answer

    gpu0 = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.10 GiB free")
    gpu1 = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has 0.93 GiB free")
    assert _answer(gpu0) == _answer(gpu1) == "OutOfMemoryError"
    assert _answer(RuntimeError("a")) != _answer(RuntimeError("b")) and _answer(None) is None


def test_cpu_ranks_on_a_machine_with_an_accelerator_are_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' tensor-parallel load puts each rank's shard on the machine's accelerator whatever
    `--device cpu` says (its mesh takes torch's current accelerator): with one visible, the pair is refused in
    one line saying what to do; without one (this machine, CI) it loads as asked. The accelerator's presence is
    the one thing stubbed: no GPU is here to show it."""
    import torch

    from app.config import Settings
    from app.model.compute.loader import ModelLoadError, preflight

    settings = Settings(model="tiny", device="cpu", tensor_parallel_size=2, cache_dir=tmp_path)
    preflight(settings)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    with pytest.raises(ModelLoadError, match=r"CUDA_VISIBLE_DEVICES=\) to shard over CPU processes"):
        preflight(settings)
    preflight(Settings(model="tiny", device="cpu", cache_dir=tmp_path))  # one process: --device cpu holds
