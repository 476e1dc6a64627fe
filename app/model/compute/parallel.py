"""Tensor parallelism: rank 0's generator repeats its device work on the other ranks, each on its shard.

Every rank holds the model as transformers' `tp_plan` shards it (app/model/ranks.py starts them) and a
`BatchGenerator` over its share of the KV cache. Only rank 0 runs the engine; its generator is a
`LeaderGenerator`, which sends each piece of device work to the followers before doing it itself: a prefill
(the prompts' ids, their audio samples, the slots rank 0 chose), a step (the [4, rows] host tensor of ids,
positions, slots and order the lean decoder reads) and a slot move (sources, targets, length). The followers
(`follow`) do the same work with the same inputs, meeting rank 0 in the model's all-reduces. Mirrored there,
not at the engine's calls (prefill/step/select/merge): slot bookkeeping, which depends on when rank 0's batch
states are collected, stays on rank 0 alone, and followers hold no batch state, only cache contents.

Who samples: rank 0 alone, in its engine. Each rank computes the same replicated logits (the head is not
sharded), but sampling needs what only the engine holds (each row's generator, grammar matcher, stop strings),
and a step's ids reach the followers inside the step's host tensor anyway: one source of tokens, whatever the
last bits of each rank's logits. Followers drop their logits.

After each piece of work every follower answers (None, or its error's type and text). Ranks that disagree
(one failed, one did not) no longer hold the same cache: `on_lost` is told and the server stops; the same
error on every rank (an input both rejected) fails only the rows, as in one process.

No wait on the followers is unbounded (a rank that fails alone must not leave the others in an all-reduce
for ever): the ranks meet in every collective, so once rank 0's part is done a follower's answer is a short
tail away; one that has not answered within `Followers.timeout_s` is hung (stuck in a collective rank 0 left,
or stopped) and the ranks are lost. Collectives themselves time out as fast once loaded (app/model/ranks.py).
Once lost, every piece of work fails at once: no collective is entered with ranks out of step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import numpy as np
import torch

from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator
from app.model.compute.slots import CachePlan

log = logging.getLogger(__name__)

T = TypeVar("T")
Answer = str | None
"""A follower's answer to one piece of work: None, or its error as `type: text`."""


@dataclass(frozen=True)
class Start:
    """What rank 0 decided that the followers' generators must share: the same slots, the same padding."""

    plan: CachePlan
    pad_token_id: int
    encoder_cache_bytes: int


@dataclass
class Followers:
    """Rank 0's ends of the pipes to ranks 1..N-1, and who to tell when they fall out of step."""

    pipes: list[Connection]
    group: Any
    """The tensor-parallel process group (torch.distributed)."""
    on_lost: Callable[[str], None]
    timeout_s: float
    """How long rank 0 waits for a follower to take a prefill and to answer a piece of work once its own part is
    done (--tensor-parallel-timeout-s); past it the ranks are lost."""


class LeaderGenerator(BatchGenerator):
    """Rank 0's generator: each prefill, step and slot move goes to the followers first, then runs here."""

    def __init__(self, model: Any, pad_token_id: int, log_mel: LogMel, followers: Followers, **kwargs: Any) -> None:
        super().__init__(model, pad_token_id, log_mel, group=followers.group, **kwargs)
        self.followers = followers
        self.lost: str | None = None
        """Why the ranks no longer hold the same cache (they fell out of step, one is gone or silent)."""
        q = self.model.model.language_model.layers[0].self_attn.q_proj.weight
        log.info(
            "tensor-parallel over %d ranks: each holds %d of %d query heads, %d KV heads (q_proj %s of %s)",
            followers.group.size(),
            self.decoder.heads,
            self.text_config.num_attention_heads,
            self.decoder.kv_heads,
            tuple(getattr(q, "_local_tensor", q).shape),
            tuple(q.shape),
        )
        start = Start(self.plan, pad_token_id, self.encoder_cache.max_bytes)
        for pipe in followers.pipes:
            pipe.send(start)

    def _prefill_into(
        self, prompts: list[list[int]], audios: list[np.ndarray], slots: list[int], past: int = 0
    ) -> torch.Tensor:
        return self._mirrored("_prefill_into", super()._prefill_into, prompts, audios, slots, past)

    def _run(self, host: torch.Tensor, width: int) -> torch.Tensor:
        return self._mirrored("_run", super()._run, host, width)

    def _copy(self, sources: list[int], targets: list[int], length: int) -> None:
        self._mirrored("_copy", super()._copy, sources, targets, length)

    def _mirrored(self, name: str, here: Callable[..., T], *args: Any) -> T:
        """`here(*args)` on this rank and `name(*args)` on every follower; raises what this rank raised."""
        if self.lost is not None:
            raise RuntimeError(f"the tensor-parallel ranks are lost ({self.lost}); the server is stopping")
        self._send(name, args)
        mine: BaseException | None = None
        try:
            result = here(*args)
        except BaseException as exc:
            mine = exc
        theirs = self._answers()
        if any(_answer(mine) != answer for answer in theirs):
            self._lose(f"the tensor-parallel ranks fell out of step in {name}: rank 0 {_answer(mine)}, others {theirs}")
        if mine is not None:
            raise mine
        return result

    def _send(self, name: str, args: tuple[Any, ...]) -> None:
        """Hand the work to every follower. A step's or a move's few hundred bytes always fit the pipe's buffer
        (a follower reads each piece before it answers, and rank 0 waits for the answers); a prefill's audio may
        not, so a follower that takes none within the timeout is lost (the server stops, ending the wait)."""
        timeout, guard = self.followers.timeout_s, None
        if name == "_prefill_into":
            guard = threading.Timer(
                timeout, self._lose, args=(f"a tensor-parallel rank took no work in {timeout:g} s",)
            )
            guard.daemon = True
            guard.start()
        piece = (name, tuple(_Host(a.numpy()) if _host_tensor(a) else a for a in args))
        try:
            for pipe in self.followers.pipes:
                pipe.send(piece)
        except OSError as exc:
            self._lose(f"a tensor-parallel rank is gone ({exc})")
            raise
        finally:
            if guard is not None:
                guard.cancel()

    def _answers(self) -> list[Answer]:
        """Each follower's answer, or why there is none: gone, or silent past the timeout (hung or stopped)."""
        answers: list[Answer] = []
        deadline = time.monotonic() + self.followers.timeout_s
        for rank, pipe in enumerate(self.followers.pipes, start=1):
            try:
                if pipe.poll(max(0.0, deadline - time.monotonic())):
                    answers.append(pipe.recv())
                else:
                    answers.append(f"rank {rank} did not answer within {self.followers.timeout_s:g} s")
            except (EOFError, OSError):
                answers.append(f"rank {rank} is gone")
        return answers

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.critical("%s: stopping the server", reason)
            self.followers.on_lost(reason)


def _answer(exc: BaseException | None) -> Answer:
    """What a rank says of a piece of work; an out-of-memory error by its type alone (its message names the
    rank's GPU and its free bytes), so the same error on every rank is the same answer, and the batch splits."""
    if exc is None:
        return None
    return type(exc).__name__ if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Host:
    """A host tensor on its way to a follower, as its numpy array: torch pickles a tensor through shared memory
    and a file descriptor a piece, ten times the cost of an array's bytes."""

    array: np.ndarray


def _host_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def follow(generator: BatchGenerator, pipe: Connection) -> None:
    """Do what rank 0 sends, piece by piece, answering each, until rank 0 closes the pipe (or exits)."""
    work: dict[str, Callable[..., Any]] = {
        "_prefill_into": generator._prefill_into,
        "_run": generator._run,
        "_copy": generator._copy,
    }
    while True:
        try:
            name, sent = pipe.recv()
        except EOFError:
            return
        args = [torch.from_numpy(a.array) if isinstance(a, _Host) else a for a in sent]
        try:
            with torch.inference_mode():
                work[name](*args)
        except Exception as exc:
            log.warning("%s failed on this rank: %s: %s", name, type(exc).__name__, exc)
            pipe.send(_answer(exc))
        else:
            pipe.send(None)


def follower_generator(model: Any, log_mel: LogMel, start: Start, group: Any) -> BatchGenerator:
    """A follower's generator: rank 0's plan and padding, its own shard of the cache."""
    return BatchGenerator(
        model,
        start.pad_token_id,
        log_mel,
        cache=start.plan,
        eager=True,
        encoder_cache_bytes=start.encoder_cache_bytes,
        group=group,
        prefix_caching=False,  # rank 0 decides which slots hold what; followers only mirror its device work
    )
