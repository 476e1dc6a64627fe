"""A decode step's attention read through a per-row block table (paged), against today's read of contiguous slots.

Why: issue 27's one unmet point is "blocks shared between running rows, never copied per row". Today's decode
step (app/model/compute/decoder.py) attends row j over slot j of the slot cache, a strided view, with SDPA and
an additive mask over `width` positions: a row reads only its own slot, so a row whose prefix a running row
holds gets one device copy of it at admission. Rows can share blocks only if attention reads the cache through
a table of blocks a row, which SDPA cannot: it takes a paged kernel. PyTorch's own is FlexAttention with a
`BlockMask` built from that table (`BlockMask.from_kv_blocks`; compiled: Triton on CUDA, C++ on a CPU). Before
the cache is rebuilt around it, this measures it where it would run.

A cache of `--slots` slots of `--max-len` positions (one layer; heads, KV heads and head size as Voxtral Mini's
by default) holds every row's positions; half the rows (at least one) read their first `--shared` positions
from slot 0's, the other half only their own slot. For each row count:

- `max_err`: the paged read against SDPA over each row's positions gathered (its shared prefix, then its own);
- `compile_s`: the first paged call (compiling for that row count);
- `paged_ms` / `slots_ms`: one paged call, and today's step over contiguous slots (SDPA over the rows' first
  `width` positions, the shared prefix copied into each row's slot), median of `--calls`, the device
  synchronised around each;
- on CUDA, `graph_ok`: the paged read captured in a CUDA graph and replayed with the rows' positions advanced
  in place, equal to an eager call (the decode step is replayed as a graph).

One JSON line per row count:

    python bench/paged_read.py --device cuda --rows 1,8,32,128           # on a GPU (bench/gpu_check.sh paged)
    python bench/paged_read.py --device cpu --small                      # the CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

PAGE = 128
"""Positions a block of the table: FlexAttention's default block size (its kernels' tile)."""


def paged(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    own: torch.Tensor,
    lender: torch.Tensor,
    shared: torch.Tensor,
    pos: torch.Tensor,
    max_len: int,
) -> torch.Tensor:
    """Row b's query [rows, heads, 1, head_dim] over positions < shared[b] of slot lender[b], then positions
    shared[b]..pos[b] of slot own[b]; `keys`/`values` [1, kv_heads, slots x max_len, head_dim]: the cache as
    one sequence of blocks. The block table is built here from the four [rows] tensors, all on the device, in
    shapes that depend on the row count only (a CUDA graph replays it)."""
    rows, blocks = q.shape[0], keys.shape[2] // PAGE
    per_slot = max_len // PAGE
    lent = (shared + PAGE - 1) // PAGE
    first_own = shared // PAGE
    index = torch.arange(blocks, device=q.device)
    table = torch.where(
        index < lent[:, None],
        lender[:, None] * per_slot + index,
        own[:, None] * per_slot + first_own[:, None] + index - lent[:, None],
    )
    count = lent + pos // PAGE + 1 - first_own
    table = torch.where(index < count[:, None], table, 0).to(torch.int32).view(rows, 1, 1, blocks)
    count = count.to(torch.int32).view(rows, 1, 1)

    def visible(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        slot, at = kv_idx // max_len, kv_idx % max_len
        return ((slot == lender[b]) & (at < shared[b])) | ((slot == own[b]) & (at >= shared[b]) & (at <= pos[b]))

    mask = BlockMask.from_kv_blocks(
        count,
        table,
        torch.zeros_like(count),  # no block is wholly visible: torch's CPU kernel needs them named (2.13)
        torch.zeros_like(table),
        BLOCK_SIZE=PAGE,
        mask_mod=visible,
        seq_lengths=(1, keys.shape[2]),
        compute_q_blocks=False,
    )
    out: torch.Tensor = flex_attention(q, keys, values, block_mask=mask, enable_gqa=True, scale=q.shape[-1] ** -0.5)  # type: ignore[assignment]
    return out


def today(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, width: int, kv_heads: int) -> torch.Tensor:
    """The lean step's attention: rows over the first `width` positions of their own slots (slot-major cache)."""
    rows, heads, _, dim = q.shape
    return F.scaled_dot_product_attention(
        q.view(rows, kv_heads, heads // kv_heads, dim),
        kv[:rows, :kv_heads, :width],
        kv[:rows, kv_heads:, :width],
        attn_mask=mask,
        scale=dim**-0.5,
    )


def timed(call: Callable[[], Any], device: torch.device, calls: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(calls):
        sync()
        started = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def cache(args: argparse.Namespace) -> torch.Tensor:
    """The cache, head-major [2 x kv_heads, slots, max_len, head_dim] (keys' heads, then values'), random, made
    on the device once for every row count."""
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (2 * args.kv_heads, args.slots, args.max_len, args.head_dim)
    return torch.randn(shape, generator=gen, device=device, dtype=args.dtype)


def measure(args: argparse.Namespace, rows: int, compiled: Any, head_major: torch.Tensor) -> dict[str, Any]:
    device, dtype = torch.device(args.device), args.dtype
    gen = torch.Generator(device="cpu").manual_seed(rows)
    kvh, heads, dim, slots, max_len = args.kv_heads, args.heads, args.head_dim, args.slots, args.max_len
    keys = head_major[:kvh].reshape(1, kvh, slots * max_len, dim)
    values = head_major[kvh:].reshape(1, kvh, slots * max_len, dim)
    q = torch.randn(rows, heads, 1, dim, generator=gen).to(device, dtype)
    own = torch.arange(1, rows + 1)  # slot 0 lends; row b owns slot b + 1
    sharing = torch.arange(rows) < max(1, rows // 2)
    shared = torch.where(sharing, args.shared, 0)
    pos = torch.randint(args.shared, max_len - 1, (rows,), generator=gen)
    lender = torch.where(sharing, 0, own)
    on = [t.to(device) for t in (own, lender, shared, pos)]

    want = []
    for b in range(rows):  # the reference: each row's positions gathered (slot 0's, then its own), SDPA
        start, end = int(own[b]) * max_len + int(shared[b]), int(own[b]) * max_len + int(pos[b]) + 1
        k = torch.cat([keys[0, :, : int(shared[b])], keys[0, :, start:end]], 1)
        v = torch.cat([values[0, :, : int(shared[b])], values[0, :, start:end]], 1)
        qb = q[b].view(kvh, heads // kvh, 1, dim)
        want.append(F.scaled_dot_product_attention(qb, k[:, None], v[:, None], scale=dim**-0.5).reshape(heads, 1, dim))
    reference = torch.stack(want).float()

    started = time.perf_counter()
    got = compiled(q, keys, values, *on, max_len)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - started
    max_err = float((got.float() - reference).abs().max())

    slot_major = head_major[:, 1 : rows + 1].transpose(0, 1).contiguous()  # row b's own slot at index b
    for b in range(rows):  # the copy today's rows get at admission
        slot_major[b, :, : int(shared[b])] = head_major[:, 0, : int(shared[b])]
    width = int(pos.max()) + 1
    allowed = torch.arange(width)[None, :] <= pos[:, None]
    mask = torch.where(allowed, 0.0, float("-inf")).to(device, dtype).view(rows, 1, 1, width)
    check = today(q, slot_major, mask, width, kvh).reshape(rows, heads, 1, dim).float()
    line: dict[str, Any] = {
        "section": "paged",
        "rows": rows,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "slots": slots,
        "max_len": max_len,
        "shared": args.shared,
        "sharing_rows": int(sharing.sum()),
        "max_err": round(max_err, 6),
        "today_err": round(float((check - reference).abs().max()), 6),
        "compile_s": round(compile_s, 2),
        "paged_ms": round(timed(lambda: compiled(q, keys, values, *on, max_len), device, args.calls), 3),
        "slots_ms": round(timed(lambda: today(q, slot_major, mask, width, kvh), device, args.calls), 3),
        "width": width,
    }
    if device.type == "cuda":
        line |= graph_check(compiled, q, keys, values, on, max_len)
    return line


def graph_check(
    compiled: Any, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, on: list[torch.Tensor], max_len: int
) -> dict[str, Any]:
    """Capture the paged read, advance every row's position in place, replay: equal to an eager call?"""
    try:
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                compiled(q, keys, values, *on, max_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(q, keys, values, *on, max_len)
        on[3].add_(1)  # every row one position further
        graph.replay()
        torch.cuda.synchronize()
        eager = compiled(q, keys, values, *on, max_len)
        return {"graph_ok": bool(torch.equal(out, eager)), "graph_err": float((out - eager).abs().max())}
    except Exception as exc:  # a measurement: say what failed, go on
        return {"graph_ok": False, "graph_error": f"{type(exc).__name__}: {exc}"[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=lambda s: [int(n) for n in s.split(",")], default=None, help="1,8,32,128")
    parser.add_argument("--slots", type=int, default=None, help="slots of the cache (default: the most rows + 1)")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--shared", type=int, default=1040, help="positions the sharing rows read from slot 0")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="tiny shapes for a CPU: 4/2 heads of 16, 512 positions")
    parser.add_argument("--out", default=None, help="append each JSON line here too")
    args = parser.parse_args()
    if args.small:
        args.heads, args.kv_heads, args.head_dim, args.max_len, args.shared, args.calls = 4, 2, 16, 512, 144, 5
        args.rows = args.rows or [1, 4]
    args.rows = args.rows or [1, 8, 32, 128]
    args.slots = args.slots or max(args.rows) + 1
    args.dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    compiled = torch.compile(paged, fullgraph=True, dynamic=False)
    head_major = cache(args)
    for rows in args.rows:
        with torch.inference_mode():
            line = json.dumps(measure(args, rows, compiled, head_major))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
