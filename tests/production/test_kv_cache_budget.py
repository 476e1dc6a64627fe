"""The KV cache is sized at start-up from the settings (app/model/compute/budget.py): a budget that holds fewer
slots than --max-batch-size caps the rows the engine runs at once, and requests past the cap wait their turn;
one that holds no slot stops the start-up in one line, and the server exits 1."""

from __future__ import annotations

import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.model.compute.loader import LoadedModel
from app.model.compute.slots import CachePlan, CacheShape
from app.server import build_server
from app.wiring import Wiring
from tests.api.test_engine import CHAT, Gate
from tests.support.checks import assert_openai_error, wait_until
from tests.support.server import free_port, make_settings, serve

POSITIONS = 1024


def _slots_budget(loaded: LoadedModel, slots: int) -> int:
    """Bytes that hold exactly `slots` slots of `POSITIONS` (and the scratch slot) for the tiny model."""
    return CachePlan(slots, POSITIONS).bytes(CacheShape.of(loaded.model.config.text_config, loaded.model.dtype))


def _batch_sizes(metrics: str) -> dict[float, float]:
    """voxtral_batch_size's cumulative bucket counts, by upper bound."""
    family = next(f for f in text_string_to_metric_families(metrics) if f.name == "voxtral_batch_size")
    return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}


def test_a_budget_of_three_slots_caps_the_engine_at_three_rows_and_every_request_is_answered(
    loaded: LoadedModel, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget = _slots_budget(loaded, 3)
    capped = {"max_batch_size": 8, "context_length": POSITIONS, "kv_cache_memory_bytes": budget}
    with caplog.at_level(logging.INFO), ThreadPoolExecutor(8) as pool, serve(loaded, tiny_dir, **capped) as server:
        assert server.engine.config.max_batch_size == 3
        gate = Gate()
        server.generator.fault = gate
        with server.http() as http:
            held = pool.submit(http.post, "/v1/chat/completions", json=CHAT)
            assert gate.entered.wait(10)
            rest = [pool.submit(http.post, "/v1/chat/completions", json=CHAT) for _ in range(7)]
            wait_until(lambda: server.engine.waiting == 7, "seven requests wait behind the first")
            server.generator.fault = None
            gate.release.set()
            assert [f.result().status_code for f in [held, *rest]] == [200] * 8
            buckets = _batch_sizes(http.get("/metrics").text)
            refused = http.post("/v1/chat/completions", json={**CHAT, "n": 4})
        assert server.wiring is not None and server.wiring.runtime is not None
        seen = server.wiring.runtime.generator.graphs.seen
    assert max(rows for rows, _ in seen) == 3
    assert buckets[4.0] == buckets[float("inf")] > buckets[2.0], "a batch of 3 rows ran, never more"
    assert "at most 3 choices" in assert_openai_error(refused, 400)["message"]
    messages = [r.getMessage() for r in caplog.records]
    assert f"KV cache: 3 slots of {POSITIONS} positions" in "\n".join(messages)
    assert any("fewer than --max-batch-size 8: at most 3 rows decode at once" in m for m in messages)


def test_a_budget_that_holds_no_slot_fails_the_start_up_in_one_line(
    loaded: LoadedModel, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tiny_dir, port=free_port(), kv_cache_memory_bytes=_slots_budget(loaded, 1) - 1)
    wiring = Wiring(settings, loaded)
    server = build_server(wiring.app, settings, wiring.drain, wiring.failed)
    server.run()  # returns once the start-up has failed
    assert wiring.failed()
    failures = [r for r in caplog.records if r.getMessage().startswith("start-up failed")]
    assert len(failures) == 1 and not failures[0].exc_info
    assert "does not hold two slots of 32768 positions" in failures[0].getMessage()
    assert "lower --context-length (--max-model-len)" in failures[0].getMessage()


def test_the_server_exits_1_saying_the_cache_does_not_fit(tiny_dir: Path) -> None:
    """`voxtral-server serve` as an orchestrator runs it: one error line, no traceback, exit 1."""
    argv = ["--model", "tiny", "--cache-dir", str(tiny_dir), "--port", str(free_port()), "--log-format", "text"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.main",
            "serve",
            *argv,
            "--max-model-len",
            "4096",
            "--kv-cache-memory-bytes",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "start-up failed" in line]
    assert len(errors) == 1 and "does not hold two slots of 4096 positions" in errors[0], done.stderr
