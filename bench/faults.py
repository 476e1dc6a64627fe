"""The whole fault phase, three times against one server: the well-behaved sessions' latency beside each fault,
and the server's RSS after each round (issue 32, points 6 and 7).

Starts the tiny model's server (`python -m app.main serve`, its own process, so the RSS read is the server's
alone; `--jemalloc PATH` preloads that allocator into the server only) and runs `--sessions` sessions
streaming speech in real time (100 ms chunks, server VAD; bench/realtime.py's) first alone, then beside each
fault in turn, each fault a client process of its own that runs until the sessions are done:

- `flood`: one session sends `--flood-commits` commits of 100 ms at once (bench/flood.py's), every
  `--flood-every-s` (default: one burst, the issue's fault);
- `chat_parts`: a chat request of 9 x 40-minute FLAC parts (1.4 MB of JSON) every second, refused with 400;
- `slow_reader`: a raw socket with a 4 KiB receive window sends `session.update`s with 4,096-character
  prompts and never reads, until the server closes it (1008 at `--realtime-max-pending-mb`, 0.5 here: at the
  server's default, 2, the 256-event bound, ~1.1 MB of these echoes, comes first and the server just stops
  reading the client, which the bench reports as `not closed`), then again;
- `nested_json`: a session sends 200 KB of `[` every 0.2 s (`invalid_json`, the session lives on);
- `idle`: `--idle` TCP connections (as many as RLIMIT_NOFILE allows) opened once the sessions are in, never
  sending a byte: past `--max-connections` they get 503, the rest are closed by the header deadline;
- `long_strings`: a session sends `session.update` with a 900 KB prompt every 0.2 s (`string_above_max_length`).

The round (all six faults) runs `--rounds` times; the server's RSS (psutil) is read after the warm-up and
after each fault, after `--settle-s`. RSS after rounds 2 and 3 near round 1's means nothing is kept per fault.

    python bench/faults.py
    python bench/faults.py --jemalloc /usr/lib/x86_64-linux-gnu/libjemalloc.so.2

`BENCH_TRACEMALLOC=/tmp/snap` has the server start tracemalloc (5 frames) after the warm-up and write a
snapshot to /tmp/snap.N after round N (and /tmp/snap.N.gc after a `gc.collect()`), for
`python bench/faults.py --diff A B` (top 25 by file and line).
Appends the figures and the exact command to bench/RESULTS.md (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import runpy
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from subprocess import PIPE
from typing import Any

import flood as fl  # bench/flood.py: the commit flood
import httpx
import procs  # bench/procs.py
import psutil
import realtime as rt  # bench/realtime.py: the speech, the well-behaved sessions
from decode_budget import chat_body  # bench/decode_budget.py: 9 x 40 minutes of FLAC silence
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

Tally = Counter[str]
FAULTS = ("flood", "chat_parts", "slow_reader", "nested_json", "idle", "long_strings")


async def reading(ws: Any, tally: Tally) -> None:
    """Counts the events a fault's session gets back by type (and error code)."""
    async for message in ws:
        event = json.loads(message)
        tally[event["type"] + (":" + event["error"]["code"] if event["type"] == "error" else "")] += 1


async def sending_every(url: str, stop: asyncio.Event, every_s: float, message: Callable[[], str]) -> Tally:
    tally: Tally = Counter()
    async with connect(url, max_size=None) as ws:
        reader = asyncio.create_task(reading(ws, tally))
        while not stop.is_set():
            await ws.send(message())
            tally["sent"] += 1
            await asyncio.gather(asyncio.wait_for(stop.wait(), every_s), return_exceptions=True)
        await asyncio.sleep(1.0)  # the last answers
        reader.cancel()
    return tally


async def nested_json(url: str, args: argparse.Namespace, stop: asyncio.Event) -> Tally:
    return await sending_every(url, stop, 0.2, lambda: "[" * 200_000)


async def long_strings(url: str, args: argparse.Namespace, stop: asyncio.Event) -> Tally:
    update = {"type": "transcription", "audio": {"input": {"transcription": {"prompt": "p" * 900_000}}}}
    message = json.dumps({"type": "session.update", "session": update})
    return await sending_every(url, stop, 0.2, lambda: message)


async def flood(url: str, args: argparse.Namespace, stop: asyncio.Event) -> Tally:
    return Counter({k: v for k, v in vars(await fl.flood(url, args, stop)).items()})


async def chat_parts(url: str, args: argparse.Namespace, stop: asyncio.Event) -> Tally:
    tally: Tally = Counter()
    body = chat_body(9, 40)
    base = url.replace("ws://", "http://").split("/v1/")[0]
    async with httpx.AsyncClient(timeout=600) as client:
        while not stop.is_set():
            started = time.perf_counter()
            response = await client.post(base + "/v1/chat/completions", json=body)
            tally[str(response.status_code)] += 1
            tally["max_ms"] = max(tally["max_ms"], round((time.perf_counter() - started) * 1000))
            await asyncio.gather(asyncio.wait_for(stop.wait(), 1.0), return_exceptions=True)
    return tally


def slow_reader_once(url: str, tally: Tally, stop: asyncio.Event) -> None:
    """One connection that sends and never reads, until the server closes it (or 8,000 updates pass)."""
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    update = {"type": "transcription", "audio": {"input": {"transcription": {"prompt": "p" * 4096}}}}
    message = json.dumps({"type": "session.update", "session": update}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.settimeout(3)
        client = ClientProtocol(parse_uri(url))
        client.send_request(client.connect())
        sock.sendall(b"".join(client.data_to_send()))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        client.receive_data(head)
        with contextlib.suppress(OSError):
            for _ in range(8000):
                client.send_text(message)
                sock.sendall(b"".join(client.data_to_send()))
                tally["sent"] += 1
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                client.receive_data(chunk)
        tally[f"closed {client.close_rcvd.code}" if client.close_rcvd else "not closed"] += 1


async def slow_reader(url: str, args: argparse.Namespace, stop: asyncio.Event) -> Tally:
    tally: Tally = Counter()
    while not stop.is_set():
        await asyncio.to_thread(slow_reader_once, url, tally, stop)
        await asyncio.gather(asyncio.wait_for(stop.wait(), 0.5), return_exceptions=True)
    return tally


def idle_open(host: str, port: int, count: int) -> list[socket.socket]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    for _ in range(min(count, hard - 64)):
        sock = socket.socket()
        sock.connect((host, port))
        socks.append(sock)
    return socks


def idle_outcome(socks: list[socket.socket]) -> Tally:
    tally: Tally = Counter({"opened": len(socks)})
    for sock in socks:
        sock.setblocking(False)
        try:
            data = sock.recv(4096)
            tally["503" if data.startswith(b"HTTP/1.1 503") else "closed" if not data else "other"] += 1
        except BlockingIOError:
            tally["still open"] += 1
        except OSError:
            tally["reset"] += 1
        sock.close()
    return tally


async def idle(url: str, args: argparse.Namespace, stop: asyncio.Event) -> Tally:
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    socks = await asyncio.to_thread(idle_open, host, int(port), args.idle)
    await stop.wait()
    return idle_outcome(socks)


RUN: dict[str, Callable[[str, argparse.Namespace, asyncio.Event], Awaitable[Tally]]] = {
    "flood": flood,
    "chat_parts": chat_parts,
    "slow_reader": slow_reader,
    "nested_json": nested_json,
    "idle": idle,
    "long_strings": long_strings,
}


async def fault_until_stdin_closes(name: str, url: str, args: argparse.Namespace) -> None:
    """A fault's client, in a process of its own: runs until its stdin closes, then prints its tally."""
    stop = asyncio.Event()
    waiting = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    waiting.add_done_callback(lambda _: stop.set())
    print(json.dumps(dict(await RUN[name](url, args, stop))), flush=True)


async def phase(url: str, args: argparse.Namespace, fault: str | None) -> tuple[list[rt.Outcome], Tally]:
    if fault is None:
        return await rt.run_all(url, args), Counter()
    cmd = [sys.executable, __file__, "--fault", fault, "--url", url, *sys.argv[1:]]
    outcomes = asyncio.create_task(rt.run_all(url, args))
    if fault == "idle":  # once every session is in: an idle connection past the cap would refuse them
        await asyncio.sleep(len(rt.stream_audio(1, args.pause_s)) / 2 / 24000 + 1.0)
    child = await asyncio.create_subprocess_exec(*cmd, stdin=PIPE, stdout=PIPE)
    done = await outcomes
    out, _ = await child.communicate(b"")
    return done, Counter(json.loads(out))


def start_server(port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        "serve", "--model", "tiny", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
        "--realtime-max-sessions", str(args.sessions + 2), "--max-connections", str(args.max_connections),
        "--transcription-tokens-per-audio-s", str(args.tokens_per_s), "--transcription-min-tokens", "4",
        "--realtime-max-pending-mb", str(args.realtime_max_pending_mb), "--log-level", "warning",
    ]  # fmt: skip
    traced = os.environ.get("BENCH_TRACEMALLOC")
    cmd = [sys.executable, *([__file__, "--traced"] if traced else ["-m", "app.main"]), *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXTRAL_")}
    if args.jemalloc:
        env["LD_PRELOAD"] = args.jemalloc
    proc = subprocess.Popen(cmd, cwd=rt.ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    procs.wait_ready(proc, f"http://127.0.0.1:{port}", log)
    return proc


def serve_traced() -> None:
    """The server with a tracemalloc switch: the first SIGUSR1 starts tracing (after the warm-up: tracing the
    model's load would take minutes), each later one writes a snapshot to $BENCH_TRACEMALLOC.N (N = 1, 2, ...)."""
    taken = [0]

    def dump(*_: object) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(5)
        else:
            taken[0] += 1
            tracemalloc.take_snapshot().dump(f"{os.environ['BENCH_TRACEMALLOC']}.{taken[0]}")
            gc.collect()  # and again without what only the garbage collector frees (cycles)
            tracemalloc.take_snapshot().dump(f"{os.environ['BENCH_TRACEMALLOC']}.{taken[0]}.gc")

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["app.main", *sys.argv[2:]]
    sys.path.insert(0, str(rt.ROOT))
    runpy.run_module("app.main", run_name="__main__")


def diff(a: str, b: str) -> None:
    before, after = tracemalloc.Snapshot.load(a), tracemalloc.Snapshot.load(b)
    for stat in after.compare_to(before, "lineno")[:25]:
        print(stat)


def settled_rss(proc: subprocess.Popen[bytes], settle_s: float) -> float:
    time.sleep(settle_s)
    if os.environ.get("BENCH_TRACEMALLOC"):
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2.0)
    return float(psutil.Process(proc.pid).memory_info().rss / 2**20)


def run(args: argparse.Namespace, url: str, proc: subprocess.Popen[bytes]) -> tuple[list[str], list[str]]:
    rows, rss_rows = [], []
    outcomes, _ = asyncio.run(phase(url, args, None))
    rows.append(f"| warm-up | alone | {rt.figures(outcomes)} | |")
    warm = settled_rss(proc, args.settle_s)
    for round_ in range(1, args.rounds + 1):
        after = []
        for fault in args.faults.split(","):
            outcomes, tally = asyncio.run(phase(url, args, fault))
            rows.append(f"| {round_} | {fault} | {rt.figures(outcomes)} | {dict(tally)} |")
            print(rows[-1], flush=True)
            after.append(psutil.Process(proc.pid).memory_info().rss / 2**20)
        end = settled_rss(proc, args.settle_s)
        rss_rows.append(f"| {round_} | {warm:.0f} | " + " | ".join(f"{x:.0f}" for x in after) + f" | {end:.0f} |")
        print(rss_rows[-1], flush=True)
    return rows, rss_rows


def report(rows: list[str], rss_rows: list[str], args: argparse.Namespace) -> str:
    faults = args.faults.split(",")
    return "\n".join(
        [
            f"{args.sessions} sessions x {args.utterances} utterances, speech_stopped -> .completed (s), "
            f"allocator: {args.jemalloc or 'glibc'}:",
            "",
            "| round | beside | p50 | p95 | max | completed | failed | the fault's client got |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "Server RSS (MiB): after the warm-up, after each fault, and after the round and "
            f"{args.settle_s:g} s of quiet:",
            "",
            "| round | warm-up | " + " | ".join(faults) + " | round end |",
            "| --- | --- | " + " | ".join("---" for _ in faults) + " | --- |",
            *rss_rows,
        ]
    )


def main() -> None:
    if sys.argv[1:2] == ["--traced"]:
        return serve_traced()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rt.session_args(parser, sessions=8)
    parser.add_argument("--flood-commits", type=int, default=600)
    parser.add_argument("--flood-every-s", type=float, default=1000.0)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--max-connections", type=int, default=1024)
    parser.add_argument("--realtime-max-pending-mb", type=float, default=0.5)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--jemalloc", default="", help="LD_PRELOAD this allocator into the server")
    parser.add_argument("--out", default=str(rt.ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--diff", nargs=2, default=None, help="two tracemalloc snapshots: print the top growth")
    parser.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # a fault's client process
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.diff:
        return diff(*args.diff)
    if args.fault is not None:
        return asyncio.run(fault_until_stdin_closes(args.fault, args.url, args))
    port = procs.free_port()
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    with rt.serving(lambda log: start_server(port, args, log)) as proc:
        rows, rss_rows = run(args, url, proc)
    rt.publish("faults.py", report(rows, rss_rows, args), args.out)


if __name__ == "__main__":
    main()
