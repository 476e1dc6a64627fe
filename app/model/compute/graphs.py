"""The decode step replayed: one CUDA graph per (rows, width), captured at start-up; eager elsewhere.

A captured step launches the whole decoder with one call from the host; what changes between steps are the
values of one static input tensor (tokens, positions, write slots, output order: `LeanDecoder`'s
`packed`), copied in from pinned host memory without a wait. The graphs share one memory pool, and write
their logits into the first rows of ONE buffer [largest size, vocab] allocated before capture: a graph's own
output would stay allocated in the pool for as long as the graph lives, every graph's apart (131,072 tokens
of vocabulary are 0.5 MiB a row: at --max-batch-size 128, the 1,095 rows of its 20 sizes x 17 widths would
be 9 GiB). The logits a step returns are valid until the next step, as a replayed graph's are. Shapes not
captured (none, when `capture` ran for every size and width) run eagerly. On a CPU, or with
`--enforce-eager`, every step runs eagerly through the same code; so does a quantized model's
(`ModuleDecoder`): capturing torchao's and bitsandbytes' kernels is not verified on a GPU yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.model.compute.decoder import LeanDecoder, ModuleDecoder
from app.model.compute.slots import SlotCache

log = logging.getLogger(__name__)

Shape = tuple[int, int]
"""(rows, width) of a step."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor
    logits: torch.Tensor


class StepGraphs:
    """Runs `decoder` over `cache`; `seen` records every shape stepped (the shapes test reads it)."""

    def __init__(self, decoder: LeanDecoder, cache: SlotCache, device: torch.device) -> None:
        self.decoder = decoder
        self.cache = cache
        self.device = device
        self._graphs: dict[Shape, _Graph] = {}
        self._pool: Any = None
        """The graphs' shared memory pool (torch's opaque handle), once the first is captured."""
        self._logits: torch.Tensor | None = None
        """[largest size, vocab] float32: every graph's logits, in its first rows (allocated by `capture`)."""
        self._warmup: Any = None
        """The side stream every capture warms up on (made by `capture`)."""
        self.seen: set[Shape] = set()

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, packed: torch.Tensor, width: int) -> torch.Tensor:
        """Logits of one step: `packed` is the host tensor (pinned on CUDA) of `LeanDecoder.__call__`."""
        shape = (packed.shape[1], width)
        self.seen.add(shape)
        graph = self._graphs.get(shape)
        if graph is None:
            return self.decoder(_to(packed, self.device), width, self.cache)
        graph.packed.copy_(packed, non_blocking=True)
        graph.graph.replay()
        return graph.logits

    def capture(self, sizes: Sequence[int], widths: Sequence[int]) -> None:
        """Capture every (size, width) on CUDA, largest first (the pool then serves the smaller ones); log the
        time it took and the memory the graphs hold. A no-op anywhere else."""
        if self.device.type != "cuda":
            return
        if isinstance(self.decoder, ModuleDecoder) or self.decoder.head_module is not None:
            log.info("quantized linear layers: the decode step runs eagerly (capture not verified for their kernels)")
            return
        if any(buffer.device != self.device for buffer in self.cache.keys):
            log.info("the model spans several devices: the decode step runs eagerly (a graph cannot cross them)")
            return
        started = time.perf_counter()
        with torch.cuda.device(self.device):  # the capture stream torch makes is the current device's
            torch.cuda.synchronize(self.device)
            free = torch.cuda.mem_get_info(self.device)[0]
            self.cache.ready(max(widths), self.cache.slots + 1)
            vocab = self.decoder.vocab
            self._logits = torch.empty((max(sizes), vocab), dtype=torch.float32, device=self.device)
            self._warmup = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]  # torch's Stream is untyped
            for width in sorted(widths, reverse=True):
                for rows in sorted(sizes, reverse=True):
                    self._graphs[(rows, width)] = self._capture(rows, width)
            torch.cuda.synchronize(self.device)
            held = free - torch.cuda.mem_get_info(self.device)[0]  # the pool, the driver's graphs, workspaces
        log.info(
            "captured %d CUDA graphs of the decode step (%d batch sizes x %d widths) in %.1f s; they hold %.2f GiB",
            len(self._graphs),
            len(sizes),
            len(widths),
            time.perf_counter() - started,
            held / 2**30,
        )

    def _capture(self, rows: int, width: int) -> _Graph:
        assert self._logits is not None
        out = self._logits[:rows]
        packed = torch.zeros((4, rows), dtype=torch.long, device=self.device)
        packed[2] = self.cache.scratch  # warm-up and capture write only to the scratch slot
        stream = self._warmup  # one for every shape: cuBLAS keeps a workspace per stream it has run on
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.decoder(packed, width, self.cache, out)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.decoder(packed, width, self.cache, out)
        self._pool = graph.pool()
        return _Graph(graph, packed, logits)


def _to(packed: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return packed
    return packed.to(device, non_blocking=True)
