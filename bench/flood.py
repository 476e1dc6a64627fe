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

Appends the figures and the exact command to bench/RESULTS.md (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

import realtime as rt  # bench/realtime.py: the server, the speech, the well-behaved sessions
from websockets.asyncio.client import connect

COMMIT_AUDIO = base64.b64encode(bytes(int(24000 * 0.1) * 2)).decode()
"""100 ms of 24 kHz PCM (silence: with turn detection off a commit needs no speech)."""


@dataclass
class Flood:
    commits: int = 0
    completed: int = 0
    refused: int = 0
    other: int = 0


async def flood(url: str, args: argparse.Namespace, stop: asyncio.Event) -> Flood:
    tally = Flood()
    async with connect(url, max_size=None) as ws:
        update = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        reader = asyncio.create_task(read_flood(ws, tally))
        while not stop.is_set():
            for _ in range(args.flood_commits):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": COMMIT_AUDIO}))
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            tally.commits += args.flood_commits
            with_timeout = asyncio.wait_for(stop.wait(), args.flood_every_s)
            await asyncio.gather(with_timeout, return_exceptions=True)
        while tally.completed + tally.refused + tally.other < tally.commits:  # every commit is answered
            await asyncio.sleep(0.1)
        reader.cancel()
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
            f"{args.flood_every_s:g} s), {tally.completed} completed, {tally.refused} refused "
            f"(rate_limit_exceeded), {tally.other} failed otherwise.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--utterances", type=int, default=3)
    parser.add_argument("--pause-s", type=float, default=1.5)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--tokens-per-s", type=float, default=5.0)
    parser.add_argument("--spread-s", type=float, default=None)
    parser.add_argument("--flood-commits", type=int, default=600)
    parser.add_argument("--flood-every-s", type=float, default=1.0)
    parser.add_argument("--out", default=str(rt.ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--flood-url", default=None, help=argparse.SUPPRESS)  # the flooding child process
    args = parser.parse_args()
    if args.flood_url is not None:
        return asyncio.run(flood_until_stdin_closes(args.flood_url, args))
    port = rt.free_port()
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    server_args = argparse.Namespace(**{**vars(args), "sessions": args.sessions + 1})
    with tempfile.TemporaryDirectory() as tmp:
        proc = rt.start_server(port, server_args, Path(tmp) / "server.log")
        try:
            alone, _ = asyncio.run(phase(url, args, flooding=False))
            beside, tally = asyncio.run(phase(url, args, flooding=True))
        except BaseException:
            print((Path(tmp) / "server.log").read_text()[-5000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(60)
    assert tally is not None
    rt.publish("flood.py", report(alone, beside, tally, args), args.out)


if __name__ == "__main__":
    main()
