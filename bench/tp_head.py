"""`lm_head` under `--tensor-parallel-size 2`: replicated (as served) against sharded by vocabulary (issue 30, point 3).

Two gloo ranks on the CPU (one torch thread each, as app/model/ranks.py shares the cores out) hold a random head
of `--vocab` x `--hidden` and take turns, `--rounds` times, at the two ways of making a decode step's logits:

- replicated: every rank multiplies by the whole head (what the server does; followers drop their logits);
- sharded: each rank multiplies by its half of the vocabulary's rows, then the halves are gathered into every
  rank's [rows, vocab] logits (transformers' `colwise_gather_output`; rank 0 alone needs them to sample).

Prints one JSON line per (rows, layout): the head's bytes a rank holds, the median milliseconds a step's logits
take (rank 0's clock, after a barrier), and the largest difference between the two layouts' logits.

    python bench/tp_head.py [--hidden 3072] [--vocab 131072] [--rows 1 8 32] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from procs import free_port  # bench/procs.py


def replicated(head: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda hidden: hidden @ head.T


def sharded(head: torch.Tensor, rank: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    local = head.chunk(size)[rank].clone()  # this rank's rows of the vocabulary: the only copy it would hold

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        part = hidden @ local.T
        parts = [torch.empty_like(part) for _ in range(size)]
        dist.all_gather(parts, part)
        return torch.cat(parts, dim=-1)

    return logits


def timed(step: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> tuple[float, torch.Tensor]:
    dist.barrier()
    started = time.perf_counter()
    out = step(hidden)
    dist.barrier()
    return (time.perf_counter() - started) * 1000, out


def run(rank: int, size: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    head = torch.randn(args.vocab, args.hidden, generator=torch.Generator().manual_seed(0)) * 0.02
    layouts = {"replicated": replicated(head), "sharded": sharded(head, rank, size)}
    held = {"replicated": head.numel() * head.element_size(), "sharded": head.numel() * head.element_size() // size}
    for rows in args.rows:
        hidden = torch.randn(rows, args.hidden, generator=torch.Generator().manual_seed(rows))
        times: dict[str, list[float]] = {name: [] for name in layouts}
        outs: dict[str, torch.Tensor] = {}
        for round_ in range(args.rounds + 1):
            for name, step in layouts.items():  # taking turns
                ms, outs[name] = timed(step, hidden)
                if round_:  # the first round warms up
                    times[name].append(ms)
        diff = float((outs["replicated"] - outs["sharded"]).abs().max())
        for name in layouts:
            if rank == 0:
                line = {"rows": rows, "layout": name, "head_bytes_per_rank": held[name]}
                line |= {"ms_median": round(statistics.median(times[name]), 3), "ms_min": round(min(times[name]), 3)}
                print(json.dumps(line | {"max_abs_diff": diff}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=3072, help="Voxtral Mini's (Small: 5120)")
    parser.add_argument("--vocab", type=int, default=131_072)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    mp.spawn(run, args=(args.ranks, free_port(), args), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
