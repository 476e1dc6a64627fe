"""The realtime engine's tick at N live streams, against the 80 ms a token that real time allows (issue 28, point 7).

Builds a `RealtimeEngine` (app/model/realtime/) over a random Voxtral Realtime of the given shapes and times its
`tick()` with N streams open: the join tick (every stream's prompt forward: BOS, 32 left-pad and 6 delay
tokens) once, then `--ticks` steady ticks (one token a stream, one forward of N rows padded to the slot
cache's batch sizes), each from the call to its tokens on the host (the engine reads them back). A tick must
end within 80 ms (one token-frame of audio) for the streams to keep up; `x_budget` is the median over 80 ms.

Shapes: `mini`: Voxtral-Mini-4B-Realtime-2602's (transformers' `VoxtralRealtimeConfig` defaults are that
checkpoint's config: decoder 26 layers x 3,072, 32 query / 8 key-value heads of 128, sliding window 8,192
tokens; encoder 32 layers x 1,280, 32 heads of 64, window 750 frames; 131,072-token vocabulary, tied head).
`tiny`: `--model tiny-realtime`'s (app/model/tiny.py). Weights are random (what a kernel costs does not depend
on their values): built on the meta device, materialised in bfloat16 on the GPU (float32 on a CPU).

The stream caches are allocated once for N streams, per stream the rings of both sliding windows whatever the
stream's age (app/model/realtime/pool.py): at Mini's windows about 1 GiB a stream, so 128 streams do not fit
one H100 at the full decoder window. A line `memory` says what each N needs; an N that does not fit runs with
the decoder ring shortened to what fits (`decoder_window` in its line, `full_window: false`): every step's
attention reads the whole ring, so its time is that of a stream as old as that window.

    python bench/realtime_ticks.py --shapes mini --device cuda --sessions 1,32,128 --out /tmp/ticks.jsonl
    python bench/realtime_ticks.py --shapes tiny --device cpu --sessions 1,4 --ticks 3     # the CPU smoke test

`--count-copies` adds, per N, the bytes one more steady tick's data-movement ATen ops write (`copied_mib`:
index, index_select, index_put_, cat, copy_, clone, ...; `copies`: the largest by op), the join tick's
(`join_copied_mib`, `join_copies`), and at 4 streams or more a steady tick after every other stream closed
(`holes_copied_mib`: the rest then sit a free slot apart), counted by a
TorchDispatchMode: a count, so a CPU run says what a GPU tick would move. `--layers K` keeps K layers of each
stack (a mini-width few-layer variant that a CPU can step):

    python bench/realtime_ticks.py --shapes mini --layers 2 --device cpu --sessions 1,4 --ticks 1 --count-copies
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.model.realtime.engine import RealtimeEngine  # noqa: E402
from app.model.realtime.timing import FRAME_MS  # noqa: E402
from app.model.tiny import (  # noqa: E402
    NUM_SPECIAL,
    REALTIME_DECODER_WINDOW,
    REALTIME_ENCODER_WINDOW,
    build_realtime_tekken,
)

MINI_VOCAB = 131_072
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_TEXT |= {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": REALTIME_DECODER_WINDOW}
TINY_AUDIO = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_AUDIO |= {"head_dim": 16, "sliding_window": REALTIME_ENCODER_WINDOW}
"""`tiny`: app/model/tiny.py's `build_tiny_realtime_model` widths and windows."""
HEADROOM_GIB = 24.0
"""GPU memory kept free of stream caches for the tick's own tensors: at 128 rows and Mini's full decoder
window a layer's gathered keys and values (and sdpa's copy of them for grouped heads) are several GiB."""

Report = Callable[..., None]


def reporter(out: Path | None) -> Report:
    """Print each result as a JSON line (and append it to `out`)."""

    def report(section: str, **fields: Any) -> None:
        line = json.dumps({"section": section, **fields}, default=str)
        print(line, flush=True)
        if out is not None:
            with out.open("a") as sink:
                sink.write(line + "\n")

    return report


def config(shapes: str, layers: int | None = None) -> Any:
    """The VoxtralRealtimeConfig of `shapes` ("mini": the checkpoint's, transformers' defaults; "tiny"), with
    `layers` layers in each stack when given."""
    from transformers import VoxtralRealtimeConfig

    text: dict[str, Any] = {"vocab_size": MINI_VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11}
    audio: dict[str, Any] = {"model_type": "voxtral_realtime_encoder"}
    if shapes == "tiny":
        text, audio = text | TINY_TEXT, audio | {"num_mel_bins": 128, **TINY_AUDIO}
    if layers is not None:
        text, audio = text | {"num_hidden_layers": layers}, audio | {"num_hidden_layers": layers}
    return VoxtralRealtimeConfig(text_config=text, audio_config=audio)


class CopyCounter(TorchDispatchMode):
    """Bytes written by data-movement ATen ops while active, by op (in-place ones: the bytes they write)."""

    MOVES = ("index.", "index_select", "index_put", "index_copy", "cat", "stack", "copy_", "clone", "_to_copy")
    MOVES += ("gather", "_unsafe_index", "slice_scatter", "repeat", "expand_copy")

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.name().removeprefix("aten::")
        if any(name.startswith(move) or name == move.rstrip(".") for move in self.MOVES):
            written = args[-1] if name.endswith("_") and isinstance(args[-1], torch.Tensor) else out
            tensors = written if isinstance(written, list | tuple) else [written]
            size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            self.bytes[name] = self.bytes.get(name, 0) + size
        return out


def processor(work: Path) -> Any:
    """A VoxtralRealtimeProcessor whose tekken covers the whole 131,072-token vocabulary (every id a random
    model emits decodes) with the checkpoint's streaming audio settings."""
    from transformers import (  # type: ignore[attr-defined]
        MistralCommonBackend,
        VoxtralRealtimeFeatureExtractor,
        VoxtralRealtimeProcessor,
    )

    (work / "tekken.json").write_text(json.dumps(build_realtime_tekken(MINI_VOCAB - NUM_SPECIAL)), encoding="utf-8")
    tokenizer = MistralCommonBackend(tokenizer_path=str(work / "tekken.json"))
    return VoxtralRealtimeProcessor(feature_extractor=VoxtralRealtimeFeatureExtractor(), tokenizer=tokenizer)


def model(cfg: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """The random model on `device` in `dtype`: built on the meta device in `dtype` (no float32 copy, nothing
    on the host), then materialised on `device` and initialised by transformers' own `init_weights` (the
    parameters drawn from the config's initializer_range; the non-persistent buffers, the rotary and time
    embeddings' frequencies, computed again in float32 as construction computes them)."""
    from transformers import VoxtralRealtimeForConditionalGeneration

    with torch.device("meta"):
        built = VoxtralRealtimeForConditionalGeneration._from_config(cfg, dtype=dtype)
    built = built.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        built.init_weights()
    return built.eval()


def stream_bytes(cfg: Any, dtype: torch.dtype, decoder_window: int | None = None) -> int:
    """One stream's cache (app/model/realtime/pool.py): rings of window - 1 + step keys and values per layer
    of both stacks (step: encoder frames a token for the encoder, 1 for the decoder), and the convolutions'
    left context."""
    size = torch.tensor([], dtype=dtype).element_size()

    def ring(sub: Any, window: int, step: int = 1) -> int:
        return int(2 * sub.num_hidden_layers * (window - 1 + step) * sub.num_key_value_heads * sub.head_dim * size)

    text, audio = cfg.text_config, cfg.audio_config
    conv = int((audio.num_mel_bins * 2 + audio.hidden_size * 1) * size)
    encoder = ring(audio, audio.sliding_window, cfg.downsample_factor)
    return encoder + ring(text, decoder_window or text.sliding_window) + conv


def window_that_fits(cfg: Any, dtype: torch.dtype, streams: int, free: int) -> int:
    """The longest decoder window (tokens, a multiple of 256) whose caches for `streams` (and the scratch
    slot) fit `free` bytes; the checkpoint's own when it fits."""
    full = int(cfg.text_config.sliding_window)
    if (streams + 1) * stream_bytes(cfg, dtype) <= free:
        return full
    per_token = stream_bytes(cfg, dtype, 2) - stream_bytes(cfg, dtype, 1)
    fixed = stream_bytes(cfg, dtype, 1)
    tokens = (free // (streams + 1) - fixed) // per_token + 1
    return max(0, min(full, int(tokens) // 256 * 256))


def measure(mdl: Any, proc: Any, streams: int, ticks: int, seed: int = 0, count: bool = False) -> dict[str, Any]:
    """Open `streams`, give each its first frame and `ticks` more of noise, tick: the join tick, then
    `ticks` steady ones, each timed (wall: the engine reads the tokens back, so a tick ends on the host);
    with `count`, one more steady tick's copies counted."""
    engine = RealtimeEngine(mdl, proc, max_streams=streams)
    rng = np.random.default_rng(seed)
    geometry = engine.geometry
    ids = [engine.open(None) for _ in range(streams)]
    samples = geometry.first_samples(6) + (ticks + 4) * geometry.samples_per_token  # join, warm-up, `ticks`, counts
    for sid in ids:
        engine.feed(sid, (rng.standard_normal(samples) * 0.1).astype(np.float32))
    joined = CopyCounter() if count else contextlib.nullcontext()
    with joined:
        started = time.perf_counter()
        join = engine.tick()
        join_s = time.perf_counter() - started
    engine.tick()  # the first steady tick: lazy set-ups (cuBLAS workspaces, kernel choices) are not timed
    walls, rows, padded_rows = [], 0, 0
    for _ in range(ticks):
        started = time.perf_counter()
        result = engine.tick()
        walls.append(time.perf_counter() - started)
        rows, padded_rows = result.rows, result.padded_rows
        if rows != streams:
            raise RuntimeError(f"a steady tick stepped {rows} of {streams} streams")
    median_ms = 1000 * float(np.median(walls))
    copies: dict[str, Any] = {}
    if count:
        with CopyCounter() as counter:
            engine.tick()
        top = sorted(counter.bytes.items(), key=lambda item: -item[1])[:6]
        copies = {"copied_mib": round(sum(counter.bytes.values()) / 2**20, 2)}
        copies["copies"] = {name: round(size / 2**20, 2) for name, size in top}
        assert isinstance(joined, CopyCounter)
        copies["join_copied_mib"] = round(sum(joined.bytes.values()) / 2**20, 2)
        top = sorted(joined.bytes.items(), key=lambda item: -item[1])[:6]
        copies["join_copies"] = {name: round(size / 2**20, 2) for name, size in top}
        if streams >= 4:  # every other stream closed: the rest step with a free slot between each two
            for sid in ids[1::2]:
                engine.close(sid)
            with CopyCounter() as holes:
                result = engine.tick()
            copies["holes_copied_mib"] = round(sum(holes.bytes.values()) / 2**20, 2)
            copies["holes_gathered"] = getattr(result, "gathered", None)
    return copies | {
        "streams": streams,
        "join_tick_ms": round(1000 * join_s, 2),
        "join_rows": join.rows,
        "tick_ms_p50": round(median_ms, 2),
        "tick_ms_p95": round(1000 * float(np.percentile(walls, 95)), 2),
        "rows": rows,
        "padded_rows": padded_rows,
        "ticks": ticks,
        "budget_ms": FRAME_MS,
        "x_budget": round(median_ms / FRAME_MS, 3),
        "keeps_up": median_ms <= FRAME_MS,
        "ms_per_stream": round(median_ms / streams, 3),
        "cache_mib": round(engine.cache_bytes() / 2**20, 1),
    }


def run(args: argparse.Namespace, report: Report) -> None:
    """Build the model, then one line per N (the slowest last: a time limit keeps the rest)."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = config(args.shapes, args.layers)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="realtime-ticks-"))
    proc = processor(work)
    mdl = model(cfg, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in mdl.parameters())
    report(
        "realtime_built",
        shapes=args.shapes,
        layers=args.layers,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        weight_gib=round(weights / 2**30, 2),
        seconds=round(time.perf_counter() - started, 1),
    )
    report(
        "realtime_memory",
        stream_mib=round(stream_bytes(cfg, dtype) / 2**20, 2),
        decoder_window=cfg.text_config.sliding_window,
        encoder_window=cfg.audio_config.sliding_window,
        **{f"caches_gib_{n}": round((n + 1) * stream_bytes(cfg, dtype) / 2**30, 1) for n in args.sessions},
    )
    full = int(cfg.text_config.sliding_window)
    for streams in args.sessions:
        window = full
        if device.type == "cuda":
            gc.collect()  # the previous count's engine and its stream pool, before the free memory is read
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(device)[0] - int(HEADROOM_GIB * 2**30)
            window = window_that_fits(cfg, dtype, streams, free)
        if window == 0:
            report("realtime_tick", streams=streams, skipped="the stream caches do not fit even a 256-token window")
            continue
        mdl.config.text_config.sliding_window = window  # the pool's ring size (sdpa attends by the ring's mask)
        fields = {"shapes": args.shapes, "decoder_window": window, "full_window": window == full}
        try:
            fields |= measure(mdl, proc, streams, args.ticks, count=args.count_copies)
        except Exception as exc:  # out of memory, say: the next N still runs
            fields |= {"streams": streams, "error": repr(exc)[:300]}
        finally:
            mdl.config.text_config.sliding_window = full
        report("realtime_tick", **fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=["mini", "tiny"], default="mini")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sessions", type=lambda s: [int(n) for n in s.split(",")], default=[1, 32, 128])
    parser.add_argument("--ticks", type=int, default=20, help="steady ticks timed at each N")
    parser.add_argument("--layers", type=int, default=None, help="layers of each stack (default: the shapes')")
    parser.add_argument("--count-copies", action="store_true", help="count one more steady tick's copied bytes")
    parser.add_argument("--out", type=Path, default=None, help="append each JSON line here too")
    args = parser.parse_args()
    run(args, reporter(args.out))


if __name__ == "__main__":
    main()
