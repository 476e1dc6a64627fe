"""Automatic prefix caching on against off (`--no-enable-prefix-caching`), on the workloads it is for, in one run.

Two servers on the same model stay up side by side, identical but for that flag (the audio encoder cache is on
in both, so the difference is the prefix cache alone), and take turns: each round runs every workload on both,
the order of the two alternating between rounds, and every ratio is taken within a round (the summary gives the
median over the rounds and their range). Each round uses its own recordings, tool set and prompt nonce, so
nothing a round measures was cached by an earlier one.

(a) `conversation`: a 5-turn chat about one 30 s recording (the tests/data speech clips joined), each turn
    resending the whole conversation (audio, questions, the answers so far) as clients do. Per turn: prompt
    tokens, `usage.prompt_tokens_details.cached_tokens`, what was prefilled (prompt - cached), what is new since
    the previous turn's prompt (its answer and the new question), and the latency.
(b) `tools`: 20 tool definitions (the same in every request: the `[AVAILABLE_TOOLS]` block) and a short user
    audio that differs between requests, at --concurrency; throughput.
(c) `transcription`: the same file transcribed 8 times, one after the other; latency of the repeats (2-8).
(d) `no_reuse`: distinct chat prompts (a nonce first, so they differ from the first block on), at
    --concurrency: nothing to reuse, so this is what the bookkeeping costs; throughput.

Besides wall-clock figures, each run records the server process's CPU time per request (user + system, all
threads, /proc): on a machine shared with other work it moves far less than wall-clock time does, so it is
what "nothing is slower with nothing to reuse" is read from. The tiny random model never stops by itself:
every request generates exactly --tokens tokens.

    python bench/prefix_cache.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf
from procs import free_port, wait_ready  # bench/procs.py

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "tests" / "data"
CLIPS = ["jfk.wav", *(f"speech_{code}.wav" for code in ("en", "fr", "de", "es", "it", "pt", "nl", "hi"))]
RATE = 16000
CONFIGS = {"on": [], "off": ["--no-enable-prefix-caching"]}
QUESTIONS = [
    "What is said in this recording?",
    "Who is speaking, and to whom?",
    "Summarise the second half in one sentence.",
    "Which words are stressed the most?",
    "Translate the first sentence into French.",
]


def clips() -> list[np.ndarray]:
    return [sf.read(AUDIO / name, dtype="float32")[0] for name in CLIPS]


def recording(seconds: float, seed: int) -> np.ndarray:
    """`seconds` of the speech clips, joined in an order of `seed`'s (a different recording per seed)."""
    rng, pool = np.random.default_rng(seed), clips()
    parts: list[np.ndarray] = []
    while sum(p.shape[0] for p in parts) < seconds * RATE:
        parts.append(pool[int(rng.integers(len(pool)))])
    joined = np.concatenate(parts)
    start = int(rng.integers(0, RATE))  # an offset too: the same clip order never gives the same samples
    return joined[start : start + int(seconds * RATE)]


def wav(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def audio_part(samples: np.ndarray) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(samples)).decode(), "format": "wav"}}


def tools(nonce: int) -> list[dict[str, Any]]:
    """20 function definitions of a voice assistant's size (a description and 3 typed parameters each)."""
    verbs = ["get", "set", "list", "find", "cancel"]
    nouns = ["weather", "alarm", "timer", "contact", "calendar_event", "reminder", "song", "route"]
    out = []
    for i in range(20):
        name = f"{verbs[i % 5]}_{nouns[i % 8]}_{i}"
        params = {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": f"What to {verbs[i % 5]} (round {nonce})."},
                "limit": {"type": "integer", "description": "How many results at most."},
                "when": {"type": "string", "description": "An ISO 8601 date and time, or 'now'."},
            },
            "required": ["query"],
        }
        description = f"{verbs[i % 5].capitalize()} the user's {nouns[i % 8].replace('_', ' ')} entries."
        out.append({"type": "function", "function": {"name": name, "description": description, "parameters": params}})
    return out


@contextmanager
def server(model_dir: Path, extra: list[str], log: Path, tokens: int, batch: int) -> Iterator[tuple[str, int]]:
    port = free_port()
    cmd = [sys.executable, "-m", "app.main", "serve", "--model", str(model_dir), "--port", str(port), *extra]
    cmd += ["--max-batch-size", str(batch), "--max-queue", "4096", "--transcription-min-tokens", str(tokens)]
    cmd += ["--transcription-tokens-per-audio-s", "0", "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_ready(proc, url, log)
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(30)


def prefix_counts(url: str) -> tuple[float, float]:
    """(prompt tokens looked up, found) in the prefix cache so far: vLLM's counters."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {"vllm:prefix_cache_queries": 0.0, "vllm:prefix_cache_hits": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name in found:
            found[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return found["vllm:prefix_cache_queries"], found["vllm:prefix_cache_hits"]


async def chat(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return response.json(), elapsed


async def conversation(url: str, model: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """(a): the turns, each resending the conversation so far; per turn its token counts and latency."""
    messages: list[dict[str, Any]] = []
    turns, previous = [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for k, question in enumerate(QUESTIONS):
            content: Any = (
                [audio_part(recording(30.0, seed)), {"type": "text", "text": question}] if k == 0 else question
            )
            messages.append({"role": "user", "content": content})
            body = {"model": model, "messages": messages, "max_tokens": args.tokens, "temperature": 0}
            answer, elapsed = await chat(client, body)
            usage = answer["usage"]
            prompt, cached = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
            turns.append({"prompt": prompt, "cached": cached, "prefilled": prompt - cached, "new": prompt - previous})
            turns[-1]["latency_s"] = round(elapsed, 4)
            messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"] or ""})
            previous = prompt
    return {"turns": turns}


async def under_load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Every body sent, `concurrency` at a time: requests per second and the prompt tokens taken from cache."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    cached = prompt = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(body: dict[str, Any]) -> None:
            nonlocal cached, prompt
            async with gate:
                answer, _ = await chat(client, body)
            prompt += answer["usage"]["prompt_tokens"]
            cached += answer["usage"]["prompt_tokens_details"]["cached_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - started
    return {"rps": round(len(bodies) / wall, 3), "prompt_tokens": prompt, "cached_tokens": cached}


def tools_bodies(model: str, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """(b): the same 20 tools, each request its own 2 s of speech (so only the tools block repeats)."""
    speech = recording(2.0 * args.n + 1, seed + 1000)
    offered = tools(seed)
    bodies = []
    for i in range(args.n):
        part = audio_part(speech[i * 2 * RATE : (i + 1) * 2 * RATE])
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "Do what I ask."}]}]
        body = {"model": model, "messages": messages, "tools": offered, "tool_choice": "auto"}
        bodies.append({**body, "max_tokens": args.tokens, "temperature": 0})
    return bodies


def no_reuse_bodies(model: str, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """(d): prompts that differ from their first token on (a nonce first), of the tools prompts' length."""
    rng = np.random.default_rng(seed + 2000)
    words = [
        "the",
        "a",
        "model",
        "of",
        "audio",
        "speech",
        "server",
        "cache",
        "token",
        "batch",
        "slot",
        "prompt",
        "answer",
        "voice",
        "tool",
    ]
    bodies = []
    for i in range(args.n):
        text = f"{seed}-{i} " + " ".join(rng.choice(words, 300))
        messages = [{"role": "user", "content": text}]
        bodies.append({"model": model, "messages": messages, "max_tokens": args.tokens, "temperature": 0})
    return bodies


async def transcriptions(url: str, model: str, seed: int) -> dict[str, Any]:
    """(c): one file sent 8 times in a row: each request's latency."""
    data = wav(recording(30.0, seed + 3000))
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for _ in range(8):
            started = time.perf_counter()
            response = await client.post(
                "/v1/audio/transcriptions", files={"file": ("r.wav", data, "audio/wav")}, data={"model": model}
            )
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
    return {"first_s": round(latencies[0], 4), "repeats_median_s": round(statistics.median(latencies[1:]), 4)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far: less moved by other processes on
    a shared machine than wall-clock time is."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_workload(name: str, target: tuple[str, int], model: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    (url, pid), cpu = target, cpu_seconds(target[1])
    before = prefix_counts(url)
    if name == "conversation":
        out = asyncio.run(conversation(url, model, args, seed))
    elif name == "tools":
        out = asyncio.run(under_load(url, tools_bodies(model, args, seed), args.concurrency))
    elif name == "no_reuse":
        out = asyncio.run(under_load(url, no_reuse_bodies(model, args, seed), args.concurrency))
    else:
        out = asyncio.run(transcriptions(url, model, seed))
    queries, hits = (after - b for after, b in zip(prefix_counts(url), before, strict=True))
    requests = {"tools": args.n, "no_reuse": args.n, "transcription": 8, "conversation": len(QUESTIONS)}[name]
    cpu_ms = 1000 * (cpu_seconds(pid) - cpu) / requests
    return {
        **out,
        "queried_tokens": int(queries),
        "hit_tokens": int(hits),
        "server_cpu_ms_per_request": round(cpu_ms, 2),
    }


def summarise(rows: list[dict[str, Any]]) -> None:
    by = {(r["workload"], r["config"], r["round"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    print("\n| workload | measure | on | off | on vs off (median, range) |\n| --- | --- | --- | --- | --- |")
    for workload, key, higher in (
        ("tools", "rps", True),
        ("no_reuse", "rps", True),
        ("transcription", "repeats_median_s", False),
        ("conversation", "later_turns_s", False),
        ("tools", "server_cpu_ms_per_request", False),
        ("no_reuse", "server_cpu_ms_per_request", False),
    ):
        pairs = [(by[(workload, "on", k)], by[(workload, "off", k)]) for k in rounds if (workload, "on", k) in by]
        if not pairs:
            continue
        on, off = ([_value(r, key) for r in side] for side in zip(*pairs, strict=True))
        ratios = [a / b if higher else b / a for a, b in zip(on, off, strict=True)]
        spread = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"| {workload} | {key} | {statistics.median(on):.3f} | {statistics.median(off):.3f} | {spread} |")
    print("\n| config | turn | prompt | new since last turn | cached | prefilled | latency median s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config in CONFIGS:
        runs = [by[("conversation", config, k)]["turns"] for k in rounds if ("conversation", config, k) in by]
        for t in range(len(runs[0]) if runs else 0):
            turn = [r[t] for r in runs]
            cells = " | ".join(str(turn[0][f]) for f in ("prompt", "new", "cached", "prefilled"))
            print(f"| {config} | {t + 1} | {cells} | {statistics.median(x['latency_s'] for x in turn):.3f} |")


def _value(row: dict[str, Any], key: str) -> float:
    """A run's figure; `later_turns_s`: the conversation's turns 2-5, their latencies summed."""
    if key == "later_turns_s":
        return float(sum(t["latency_s"] for t in row["turns"][1:]))
    return float(row[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=96, help="requests per run of the tools and no_reuse workloads")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8, help="tokens each request generates")
    parser.add_argument("--tiny-layers", type=int, default=2, help="decoder layers of the tiny model")
    parser.add_argument("--model-dir", type=Path, default=None, help="a checkpoint instead of the tiny model")
    parser.add_argument("--workloads", default="conversation,tools,transcription,no_reuse")
    parser.add_argument("--out", type=Path, default=None, help="every run's figures as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="voxtral-prefix-"))
    sys.path.insert(0, str(ROOT))
    from app.model.tiny import build_tiny_model

    model_dir = args.model_dir or build_tiny_model(work / "tiny", text_layers=args.tiny_layers)
    rows = []
    with ExitStack() as stack:
        urls = {
            c: stack.enter_context(server(model_dir, x, work / f"{c}.log", args.tokens, 32)) for c, x in CONFIGS.items()
        }
        model = httpx.get(urls["on"][0] + "/v1/models").json()["data"][0]["id"]
        for k in range(args.rounds):
            for workload in args.workloads.split(","):
                for config in list(CONFIGS) if k % 2 == 0 else list(CONFIGS)[::-1]:
                    out = run_workload(workload, urls[config], model, args, seed=k)
                    rows.append({"workload": workload, "config": config, "round": k, **out})
                    print(json.dumps(rows[-1]), flush=True)
    summarise(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
