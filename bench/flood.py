"""Fair sharing under a flood: 8 real-time sessions alone, then the same 8 beside one session flooding commits.

Starts the tiny model's server (as bench/realtime.py does, whose helpers this reuses) and runs two phases
on it, one after the other: `--sessions` sessions streaming speech in real time (100 ms chunks, server VAD),
first alone, then again while one more session (a client process of its own) sends bursts of
`--flood-commits` commits of 100 ms each, all at once, every `--flood-every-s` until the others are done
(issue 32: 600 commits in 0.3 s starved the others). It prints, side by side, the well-behaved sessions'
`speech_stopped` -> `.completed` latency (p50, p95, max) and their failed utterances in each phase, and
what the flooding session got back (completed, refused with `rate_limit_exceeded`).

    python bench/flood.py                      # 8 sessions x 3 utterances, bursts of 600 commits every 1 s
    python bench/flood.py --out ''             # print only
    python bench/flood.py --realtime-max-events-per-s 1e9   # the server without its per-session pace

The flooding client sends as fast as the server reads: past the server's pace (`--realtime-max-events-per-s`,
after its burst) its sends wait on TCP, so it reports the events a second it actually got through.

Appends the figures and the exact command to bench/RESULTS.md (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

import procs  # bench/procs.py
import realtime as rt  # bench/realtime.py: the server, the speech, the well-behaved sessions
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

COMMIT_AUDIO = base64.b64encode(bytes(int(24000 * 0.1) * 2)).decode()
"""100 ms of 24 kHz PCM (silence: with turn detection off a commit needs no speech)."""


@dataclass
class Flood:
    commits: int = 0
    completed: int = 0
    refused: int = 0
    other: int = 0
    seconds: float = 0.0
    """From the first event sent to the last commit sent."""
    closed: int = 0
    """The close code, when the server closed the flooding session before every commit was answered."""


async def flood(url: str, args: argparse.Namespace, stop: asyncio.Event) -> Flood:
    tally = Flood()
    async with connect(url, max_size=None) as ws:
        update = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        reader = asyncio.create_task(read_flood(ws, tally))
        started = time.monotonic()
        with contextlib.suppress(ConnectionClosed):
            while not stop.is_set():
                for _ in range(args.flood_commits):
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": COMMIT_AUDIO}))
                    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                tally.commits += args.flood_commits
                tally.seconds = time.monotonic() - started
                with_timeout = asyncio.wait_for(stop.wait(), args.flood_every_s)
                await asyncio.gather(with_timeout, return_exceptions=True)
        while not reader.done() and tally.completed + tally.refused + tally.other < tally.commits:
            await asyncio.sleep(0.1)  # every commit is answered, unless the server closed the session
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        tally.closed = ws.close_code or 0  # still open (None) when every commit was answered
    return tally


async def read_flood(ws: object, tally: Flood) -> None:
    async for message in ws:  # type: ignore[attr-defined]
        event = json.loads(message)
        if event["type"] == "conversation.item.input_audio_transcription.completed":
            tally.completed += 1
        elif event["type"] == "conversation.item.input_audio_transcription.failed":
            code = event["error"]["code"]
            tally.refused += code == "rate_limit_exceeded"
            tally.other += code != "rate_limit_exceeded"


async def flood_until_stdin_closes(url: str, args: argparse.Namespace) -> None:
    """The flooding client, in a process of its own (so its sends cost the measured clients nothing):
    floods until its stdin closes, then prints its tally as JSON."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    waiting = loop.run_in_executor(None, sys.stdin.read)
    waiting.add_done_callback(lambda _: stop.set())
    print(json.dumps(vars(await flood(url, args, stop))), flush=True)


async def phase(url: str, args: argparse.Namespace, flooding: bool) -> tuple[list[rt.Outcome], Flood | None]:
    if not flooding:
        return await rt.run_all(url, args), None
    cmd = [sys.executable, __file__, "--flood-url", url, *sys.argv[1:]]
    child = await asyncio.create_subprocess_exec(*cmd, stdin=PIPE, stdout=PIPE)
    await asyncio.sleep(0.5)  # the first burst is in before the first utterance ends
    outcomes = await rt.run_all(url, args)
    out, _ = await child.communicate(b"")
    return outcomes, Flood(**json.loads(out))


def report(alone: list[rt.Outcome], beside: list[rt.Outcome], tally: Flood, args: argparse.Namespace) -> str:
    return "\n".join(
        [
            f"{args.sessions} sessions x {args.utterances} utterances, speech_stopped -> .completed (s):",
            "",
            "| phase | p50 | p95 | max | completed | failed |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| alone | {rt.figures(alone)} |",
            f"| beside the flood | {rt.figures(beside)} |",
            "",
            f"The flooding session: {tally.commits} commits ({args.flood_commits} at once every "
            f"{args.flood_every_s:g} s; {2 * tally.commits / max(tally.seconds, 1e-9):.0f} client events/s got "
            f"through), {tally.completed} completed, {tally.refused} refused (rate_limit_exceeded), {tally.other} "
            "failed otherwise"
            + (f"; its connection closed with code {tally.closed} before all were answered." if tally.closed else "."),
        ]
    )


def start_server(port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    """bench/realtime.py's server, with `--realtime-max-events-per-s` passed on when given."""
    given = args.realtime_max_events_per_s
    pace = [] if given is None else ["--realtime-max-events-per-s", given]
    cmd = [
        sys.executable, "-m", "app.main", "serve", "--model", "tiny", "--port", str(port),
        "--max-batch-size", str(args.max_batch_size), "--realtime-max-sessions", str(args.sessions),
        "--transcription-tokens-per-audio-s", str(args.tokens_per_s), "--transcription-min-tokens", "4",
        "--log-level", "warning", *pace,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXTRAL_")}
    proc = subprocess.Popen(cmd, cwd=rt.ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    procs.wait_ready(proc, f"http://127.0.0.1:{port}", log)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rt.session_args(parser, sessions=8)
    parser.add_argument("--flood-commits", type=int, default=600)
    parser.add_argument("--flood-every-s", type=float, default=1.0)
    parser.add_argument("--realtime-max-events-per-s", default=None, help="the server's pace (default: its own)")
    parser.add_argument("--out", default=str(rt.ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--flood-url", default=None, help=argparse.SUPPRESS)  # the flooding child process
    args = parser.parse_args()
    if args.flood_url is not None:
        return asyncio.run(flood_until_stdin_closes(args.flood_url, args))
    port = procs.free_port()
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    server_args = argparse.Namespace(**{**vars(args), "sessions": args.sessions + 1})
    with rt.serving(lambda log: start_server(port, server_args, log)):
        alone, _ = asyncio.run(phase(url, args, flooding=False))
        beside, tally = asyncio.run(phase(url, args, flooding=True))
    assert tally is not None
    rt.publish("flood.py", report(alone, beside, tally, args), args.out)


if __name__ == "__main__":
    main()
