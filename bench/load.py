"""Bounded load test on loopback: every request gets exactly one answer, nothing is lost.

Starts `python -m app.main serve --model tiny ...` as a subprocess (twice: a queue big enough for
the concurrency, then a small one), sends a fixed, seeded mix of requests (transcriptions of
jfk.wav, chat with audio, streamed chat, ~10% bad requests) at a fixed concurrency, and checks:

* sent == answered: every request got one HTTP answer, a stream exactly one finish and one [DONE];
  a connection error or a timeout counts as a failure, never as "not answered yet";
* no 5xx, and each valid request a 200 (or a 429 when the queue is full), each bad one its 4xx;
* 429s only when the queue is full: none with the big queue, some with the small one, each
  with `Retry-After` and code `queue_full`;
* the server's resident memory after the run within 10% of before it (measured after a warm-up);
* the API key never appears in the server's log.

    python bench/load.py                      # 1000 requests, concurrency 128, both queues
    python bench/load.py --n 200 --concurrency 32 --out ''

Writes the figures and the exact command to bench/RESULTS_load.md (--out). Exit status 1 if a
check failed. `tests/production/test_load.py` runs the same load (smaller) against an in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from procs import free_port  # bench/procs.py

ROOT = Path(__file__).resolve().parents[1]
JFK = ROOT / "tests" / "data" / "jfk.wav"
API_KEY = "sk-load-test-5c4b3a2918f7e6d5"
VALID = ("transcription", "chat_audio", "chat_stream")
BAD = ("bad_audio", "unknown_model", "bad_json", "bad_base64", "huge_max_tokens")
EXPECTED_STATUS = {"bad_audio": 400, "unknown_model": 404, "bad_json": 400, "bad_base64": 400, "huge_max_tokens": 400}
CHAT_TOKENS = 16


# --- the requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    index: int
    kind: str


def plan(n: int, bad_fraction: float = 0.1, seed: int = 0) -> list[Planned]:
    """A fixed mix: `bad_fraction` bad requests (each kind in turn), the rest split evenly between valid kinds."""
    rng = random.Random(seed)
    n_bad = round(n * bad_fraction)
    kinds = [BAD[i % len(BAD)] for i in range(n_bad)] + [VALID[i % len(VALID)] for i in range(n - n_bad)]
    rng.shuffle(kinds)
    return [Planned(i, kind) for i, kind in enumerate(kinds)]


class Bodies:
    def __init__(self) -> None:
        self.wav = JFK.read_bytes()
        b64 = base64.b64encode(self.wav).decode()
        part = {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
        self.chat_audio = {
            "model": "tiny",
            "max_tokens": CHAT_TOKENS,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is said?"}]}],
        }
        self.chat_stream = {
            "model": "tiny",
            "max_tokens": CHAT_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell me a story."}],
        }
        bad_part = {"type": "input_audio", "input_audio": {"data": "not base64!!", "format": "wav"}}
        self.bad_base64 = {"model": "tiny", "messages": [{"role": "user", "content": [bad_part]}]}
        self.huge = {"model": "tiny", "max_tokens": 10**9, "messages": [{"role": "user", "content": "hi"}]}
        self.noise = random.Random(1).randbytes(30_000)


# --- one request, one answer ------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    failed: int = 0
    """Connection errors, timeouts, broken streams: sent but never properly answered."""
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    retry_after_missing: int = 0
    wall_s: float = 0.0

    def count(self, kind: str, status: int, seconds: float) -> None:
        self.answered += 1
        self.statuses[kind, status] += 1
        self.latencies.setdefault(kind, []).append(seconds)

    @property
    def too_many(self) -> int:
        return sum(n for (_, status), n in self.statuses.items() if status == 429)

    @property
    def server_errors(self) -> int:
        return sum(n for (_, status), n in self.statuses.items() if status >= 500)

    def check(self, expect_429: bool) -> list[str]:
        """Everything wrong with this run; empty when it held."""
        wrong = list(self.problems)
        if self.sent != self.answered + self.failed:
            wrong.append(f"sent {self.sent} != answered {self.answered} + failed {self.failed}")
        if self.failed:
            wrong.append(f"{self.failed} request(s) got no proper answer")
        if self.server_errors:
            wrong.append(f"{self.server_errors} 5xx answer(s)")
        if expect_429 and not self.too_many:
            wrong.append("no 429 although the queue was small")
        if not expect_429 and self.too_many:
            wrong.append(f"{self.too_many} 429(s) although the queue could hold every request")
        if self.retry_after_missing:
            wrong.append(f"{self.retry_after_missing} 429(s) without Retry-After")
        return wrong


async def send_one(client: httpx.AsyncClient, bodies: Bodies, planned: Planned, tally: Tally) -> None:
    tally.sent += 1
    started = time.perf_counter()
    try:
        status = await _exchange(client, bodies, planned.kind, tally)
    except (httpx.HTTPError, ValueError) as exc:
        tally.failed += 1
        tally.problems.append(f"#{planned.index} {planned.kind}: {type(exc).__name__}: {exc}"[:300])
        return
    tally.count(planned.kind, status, time.perf_counter() - started)


async def _exchange(client: httpx.AsyncClient, bodies: Bodies, kind: str, tally: Tally) -> int:
    if kind == "chat_stream":
        async with client.stream("POST", "/v1/chat/completions", json=bodies.chat_stream) as response:
            if response.status_code == 200:
                lines = [line async for line in response.aiter_lines()]
                _check_stream(lines)
            else:
                await response.aread()
                _check_refusal(response, kind, tally)
            return response.status_code
    response = await _post(client, bodies, kind)
    if response.status_code == 200 and kind in VALID:
        _check_body(response.json(), kind)
    else:
        _check_refusal(response, kind, tally)
    return response.status_code


async def _post(client: httpx.AsyncClient, bodies: Bodies, kind: str) -> httpx.Response:
    chat = "/v1/chat/completions"
    if kind == "transcription":
        files = {"file": ("jfk.wav", bodies.wav, "audio/wav")}
        return await client.post("/v1/audio/transcriptions", files=files, data={"model": "tiny"})
    if kind == "bad_audio":
        files = {"file": ("noise.wav", bodies.noise, "audio/wav")}
        return await client.post("/v1/audio/transcriptions", files=files, data={"model": "tiny"})
    if kind == "chat_audio":
        return await client.post(chat, json=bodies.chat_audio)
    if kind == "unknown_model":
        return await client.post(chat, json={**bodies.chat_audio, "model": "gpt-4o"})
    if kind == "bad_json":
        return await client.post(
            chat, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}
        )
    if kind == "bad_base64":
        return await client.post(chat, json=bodies.bad_base64)
    return await client.post(chat, json=bodies.huge)


def _check_stream(lines: list[str]) -> None:
    """Exactly one finish, one usage chunk and one [DONE], last; no error event. ValueError otherwise."""
    data = [line[6:] for line in lines if line.startswith("data: ")]
    if data.count("[DONE]") != 1 or data[-1] != "[DONE]":
        raise ValueError(f"stream without exactly one final [DONE]: {data[-3:]}")
    events = [json.loads(d) for d in data[:-1]]
    if any("error" in e for e in events):
        raise ValueError(f"error event in stream: {[e for e in events if 'error' in e]}")
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    if finishes != ["length"] or sum(1 for e in events if e.get("usage")) != 1:
        raise ValueError(f"stream with finishes {finishes} and not exactly one usage chunk")


def _check_body(body: dict[str, Any], kind: str) -> None:
    if kind == "transcription" and not isinstance(body.get("text"), str):
        raise ValueError(f"transcription without text: {body}")
    if kind == "chat_audio" and body["choices"][0]["finish_reason"] != "length":
        raise ValueError(f"chat did not run to max_tokens: {body['choices'][0]}")


def _check_refusal(response: httpx.Response, kind: str, tally: Tally) -> None:
    status = response.status_code
    if status == 429:
        if not response.headers.get("retry-after", "").isdigit():
            tally.retry_after_missing += 1
        if response.json()["error"]["code"] != "queue_full":
            tally.problems.append(f"429 that is not queue_full: {response.text[:200]}")
        return
    if status >= 500:
        tally.problems.append(f"{kind}: {status} {response.text[:200]}")
        return
    expected = EXPECTED_STATUS.get(kind, 200)
    if status != expected:
        tally.problems.append(f"{kind}: expected {expected}, got {status} {response.text[:200]}")
    if status != 200 and set(response.json().get("error", {})) != {"message", "type", "param", "code"}:
        tally.problems.append(f"{kind}: {status} not in OpenAI's error shape: {response.text[:200]}")


async def run_load(
    base_url: str, requests: list[Planned], concurrency: int, headers: dict[str, str] | None = None
) -> Tally:
    """Send `requests`, at most `concurrency` at a time, each on its own connection slot; tally every answer."""
    bodies, tally, gate = Bodies(), Tally(), asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(300, connect=30)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, headers=headers) as client:

        async def one(planned: Planned) -> None:
            async with gate:
                await send_one(client, bodies, planned, tally)

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in requests))
        tally.wall_s = time.perf_counter() - started
    return tally


# --- the server under test --------------------------------------------------------------------------


def server_command(port: int, cache_dir: Path, max_queue: int, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "app.main", "serve", "--model", "tiny", "--port", str(port),
        "--cache-dir", str(cache_dir), "--max-queue", str(max_queue), "--max-batch-size", str(args.max_batch_size),
        "--transcription-tokens-per-audio-s", "1", "--transcription-min-tokens", "8",
        "--api-keys", API_KEY, "--log-format", "json",
    ]  # fmt: skip


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of the server. With a threshold, glibc serves every allocation of that size or more
    (audio, features, KV caches) with mmap and gives it back to the kernel when freed, so RSS tracks live
    memory and a leak shows; the stock allocator keeps freed heap pages (about 1 GB more at concurrency
    128, varying by 10-15% from round to round), which hides one. 0: the stock allocator. --server-env
    adds variables (another allocator through LD_PRELOAD, MALLOC_ARENA_MAX, ...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXTRAL_", "MALLOC_"))}
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    env.update(extra_env(args))
    return env


def extra_env(args: argparse.Namespace) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.server_env)


@contextmanager
def running_server(cmd: list[str], port: int, log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 300
            while httpx_ready(port) is False:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not become ready; see {log}")
                time.sleep(0.3)
            yield proc
        finally:
            proc.terminate()
            proc.wait(60)


def httpx_ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class RssSampler:
    """Resident memory of a process: now, and the peak seen by a background sampler."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        return int(self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.now())


@dataclass
class Outcome:
    label: str
    max_queue: int
    tally: Tally
    rss_before: int
    rss_after: int
    rss_peak: int
    key_in_log: bool
    warmup_rss: list[int]
    server_s: dict[str, list[float]]
    """Server-side durations (warm-up included), by answer class: tells server time from client-side queueing."""

    @property
    def rss_change(self) -> float:
        return (self.rss_after - self.rss_before) / self.rss_before

    def check(self, expect_429: bool) -> list[str]:
        wrong = self.tally.check(expect_429)
        if abs(self.rss_change) > 0.10:
            wrong.append(f"RSS changed {self.rss_change:+.1%} (limit 10%)")
        if self.key_in_log:
            wrong.append("the API key appears in the server log")
        return wrong


def run_against_server(label: str, max_queue: int, args: argparse.Namespace, work: Path) -> Outcome:
    port = free_port()
    log = work / f"server-{label}.log"
    headers = {"authorization": f"Bearer {API_KEY}"}
    cmd, env = server_command(port, work / "cache", max_queue, args), server_env(args)
    with running_server(cmd, port, log, env) as proc:
        url = f"http://127.0.0.1:{port}"
        with RssSampler(proc.pid) as rss:
            warmup = warm_up(url, args, headers, rss)
            before = rss.now()
            tally = asyncio.run(run_load(url, plan(args.n, args.bad_fraction), args.concurrency, headers))
            time.sleep(1.0)  # let the worker finish retiring rows and the allocator settle
            after = rss.now()
    text = log.read_text(errors="replace")
    return Outcome(label, max_queue, tally, before, after, rss.peak, API_KEY in text, warmup, server_times(text))


def server_times(log_text: str) -> dict[str, list[float]]:
    """Seconds the server itself spent per request (its access log's duration_s), by answer class."""
    times: dict[str, list[float]] = {}
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "duration_s" in entry and str(entry.get("path", "")).startswith("/v1/"):
            status = int(entry["status"])
            group = "200" if status == 200 else "429" if status == 429 else f"{status // 100}xx"
            times.setdefault(group, []).append(float(entry["duration_s"]))
    return times


def warm_up(url: str, args: argparse.Namespace, headers: dict[str, str], rss: RssSampler) -> list[int]:
    """Rounds of the same load until resident memory stops growing (< 3% over a round), at most --warmup-max.

    The first rounds grow RSS by hundreds of MB (allocator arenas and caches sized by the peak of 128
    concurrent requests, then kernels for each batch shape); it levels off after some 1,000-2,000
    requests. A baseline taken before that would count warm-up as a leak."""
    seen = [rss.now()]
    for round_ in range(max(1, args.warmup_max // args.warmup_round)):
        requests = plan(args.warmup_round, args.bad_fraction, seed=1000 + round_)
        asyncio.run(run_load(url, requests, args.concurrency, headers))
        time.sleep(1.0)
        seen.append(rss.now())
        if len(seen) >= 3 and seen[-1] < seen[-2] * 1.03:
            break
    return seen


# --- report -----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(outcome: Outcome, expect_429: bool, args: argparse.Namespace) -> list[str]:
    t, mb = outcome.tally, 2**20
    lines = [
        f"### {outcome.label}: --max-queue {outcome.max_queue}",
        "",
        f"- sent {t.sent}, answered {t.answered}, failed {t.failed}; wall {t.wall_s:.1f} s "
        f"({t.sent / t.wall_s:.1f} req/s)",
        f"- 429: {t.too_many} (each with Retry-After: {t.retry_after_missing == 0}); 5xx: {t.server_errors}",
        f"- server RSS: {outcome.rss_before / mb:.0f} MB after warm-up, {outcome.rss_after / mb:.0f} MB after the run "
        f"({outcome.rss_change:+.1%}), peak {outcome.rss_peak / mb:.0f} MB",
        f"- warm-up: {(len(outcome.warmup_rss) - 1) * args.warmup_round} requests; RSS after each round of "
        f"{args.warmup_round}: {', '.join(f'{r / mb:.0f}' for r in outcome.warmup_rss)} MB",
        f"- API key in the server log: {outcome.key_in_log}",
        "- server-side time per request (its access log, warm-up included), p50 / p99 s: "
        + "; ".join(
            f"{group}: {percentile(v, 0.5):.3f} / {percentile(v, 0.99):.3f} (n={len(v)})"
            for group, v in sorted(outcome.server_s.items())
        ),
        "",
        "| kind | answers by status | client p50 s | client p99 s |",
        "|---|---|---|---|",
    ]
    for kind in (*VALID, *BAD):
        statuses = ", ".join(f"{s}: {n}" for (k, s), n in sorted(t.statuses.items()) if k == kind)
        lat = t.latencies.get(kind, [])
        lines.append(f"| {kind} | {statuses} | {percentile(lat, 0.5):.3f} | {percentile(lat, 0.99):.3f} |")
    wrong = outcome.check(expect_429)
    lines += ["", f"**Checks: {'all held' if not wrong else 'FAILED: ' + '; '.join(wrong)}**", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--warmup-round", type=int, default=250, help="requests per warm-up round")
    parser.add_argument("--warmup-max", type=int, default=2500, help="most warm-up requests before the RSS baseline")
    parser.add_argument("--big-queue", type=int, default=512, help="--max-queue of the first run (>= concurrency)")
    parser.add_argument("--small-queue", type=int, default=8, help="--max-queue of the second run")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=131072,
        help="MALLOC_MMAP_THRESHOLD_ of the server, so RSS tracks live memory; 0: glibc's stock allocator",
    )
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE", help="add to the server's environment"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS_load.md"), help="'' to write nothing")
    parser.add_argument("--append", action="store_true", help="add this run's section to --out instead of replacing it")
    args = parser.parse_args()
    if args.big_queue < args.concurrency:
        parser.error("--big-queue must be at least --concurrency, or 429s are expected in the big-queue run")
    if args.concurrency <= args.max_batch_size + args.small_queue:
        parser.error("--concurrency must exceed --max-batch-size + --small-queue, or the small queue never fills")
    with tempfile.TemporaryDirectory(prefix="voxtral-load-") as tmp:
        work = Path(tmp)
        big = run_against_server("big queue", args.big_queue, args, work)
        small = run_against_server("small queue", args.small_queue, args, work)
    lines = summary(big, False, args) + summary(small, True, args)
    print("\n".join(lines))
    if args.out:
        write_results(Path(args.out), args, lines)
    return 1 if big.check(False) or small.check(True) else 0


def write_results(path: Path, args: argparse.Namespace, lines: list[str]) -> None:
    """The figures under the exact command; --append adds them to the file instead of replacing it."""
    command = " ".join(["python", "bench/load.py", *(shlex.quote(a) for a in sys.argv[1:])])
    server = " ".join(server_command(0, Path("TMP"), 0, args)).replace(sys.executable, "python")
    server = server.replace(" --port 0", " --port P").replace(" --max-queue 0", " --max-queue Q")
    malloc = f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} " if args.malloc_mmap_threshold else ""
    malloc += "".join(f"{k}={v} " for k, v in extra_env(args).items())
    section = [
        f"## `{command}`",
        "",
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from the repository root on {platform_line()}; "
        f"tiny random model on CPU; {args.n} requests per run at concurrency {args.concurrency} after a warm-up "
        f"(below), {args.bad_fraction:.0%} bad; chat max_tokens {CHAT_TOKENS}; transcription budget 8 + 1 token "
        "per second of audio.",
        "",
        f"Server: `{malloc}{server}`",
        "",
        *lines,
    ]
    if args.append and path.exists():
        path.write_text(path.read_text().rstrip("\n") + "\n\n" + "\n".join(section) + "\n")
    else:
        path.write_text("\n".join(["# Load test results", "", *section]) + "\n")


def platform_line() -> str:
    import platform

    return f"{platform.machine()} Linux, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
