"""The one thread that touches the model: admit, prefill, decode, sample, retire.

Iteration-level batching: between two decode steps, waiting requests are prefilled and
merged into the running batch, and finished or abandoned rows leave it, so a short request
never waits for a long one. A failure fails only the rows it touched; the loop goes on, except after an error
that leaves the device unusable (app/engine/fatal.py): then every request held or queued is answered 503
`device_failed`, the loop ends, and `on_fatal` tells whoever built the engine (the server exits).
What joins when is the scheduler's decision (scheduler.py, with the out-of-memory row cap of
oom.py), when a row ends is the stop rules' (stopping.py): this thread applies them. The model's rows
carry only their request's key; this thread alone maps keys to work items.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

import torch

from app.engine.choices import fan_out, row_of
from app.engine.choices import gather as gather_choices
from app.engine.config import EngineConfig
from app.engine.fatal import DEVICE_FAILED, device_failure
from app.engine.item import WorkItem
from app.engine.queue import RequestQueue
from app.engine.runner import ModelRunner
from app.engine.scheduler import Scheduler, Shape
from app.engine.stopping import MODEL_FAILED, Outcome, StopRules, TokenStep, still_wanted
from app.errors import DeviceFailed, InternalError
from app.metrics import Metrics
from app.model.compute.generate import BatchState, Row
from app.model.compute.sampling import Sampler
from app.types import GenerationResult, Sampled

log = logging.getLogger(__name__)


class ModelWorker:
    def __init__(
        self,
        generator: ModelRunner,
        queue: RequestQueue,
        config: EngineConfig,
        *,
        eos_token_ids: set[int],
        decode: Callable[[list[int]], str],
        metrics: Metrics,
        on_tick: Callable[[], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.generator = generator
        self.queue = queue
        self.config = config
        self.metrics = metrics
        self.on_tick = on_tick or (lambda: None)
        """Called after each turn of the loop, once its answers have left (drain waits on it)."""
        self.on_fatal = on_fatal or (lambda reason: None)
        """Called once, from this thread, when the device fails beyond repair, with why."""
        self.dead: str | None = None
        """Why the device failed beyond repair, once it has: this worker has stopped and answers nothing more."""
        self.scheduler = Scheduler(config)
        self.tokens = TokenStep(StopRules(eos_token_ids, decode), metrics)
        self.sampler = Sampler()
        self._state: BatchState | None = None
        self._logits: torch.Tensor | None = None
        self._items: dict[int, WorkItem] = {}
        """The work items of the rows this worker holds, by key (`Row.key`): set when taken from the queue,
        pruned after each turn of the loop to the rows still here."""
        self._preempted: list[Row] = []
        """Rows pushed out of the batch by an out-of-memory step or merge; re-prefilled first."""
        self._prefilling = 0
        """Rows out of the queue (or the parked list) and not yet in the batch: still held, for drain."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="voxtral-model-worker", daemon=True)

    @property
    def running(self) -> int:
        return len(self._state.rows) if self._state else 0

    @property
    def held(self) -> int:
        """Rows this worker still owes an answer: running, being prefilled, or parked after an OOM."""
        return self.running + len(self._preempted) + self._prefilling

    @property
    def prefilling(self) -> int:
        """Rows out of the queue (or the parked list) being prefilled to join the batch."""
        return self._prefilling

    @property
    def parked(self) -> int:
        """Rows pushed out by an out-of-memory error, waiting to be prefilled again."""
        return len(self._preempted)

    @property
    def slots_used(self) -> int:
        """KV cache slots the running batch holds (one a row; rows being prefilled join it at the merge)."""
        state = self._state
        return len(state.slots) if state is not None else 0

    def item(self, key: int) -> WorkItem | None:
        """The work item of the rows carrying `key`, while this worker holds them (any thread may ask)."""
        return self._items.get(key)

    @property
    def _shape(self) -> Shape:
        return (self.running, self._state.width) if self._state is not None else (0, 0)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.queue.wake()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # never let the thread die silently: the server would hang
                if (reason := device_failure(exc)) is not None:
                    return self._die(reason, exc)
                log.exception("model worker loop error")
                self._fail_running(InternalError(MODEL_FAILED))

    def _tick(self) -> None:
        idle = self._state is None and not self._preempted
        if idle:
            self.scheduler.cap.reset()
        if self._preempted:
            self._preempted = still_wanted(self._preempted, self._items)  # an abandoned parked row frees its place now
            self._readmit()
        if self.scheduler.takes_new(idle):
            self._take(idle)
        if self._state is not None:
            self._advance()
        self._forget()
        self.metrics.running.set(self.held)
        self.on_tick()

    # -- admission -----------------------------------------------------------------------------
    def _take(self, idle: bool) -> None:
        """Prefill what is waiting, one token budget at a time, as the scheduler says."""
        first = True
        while True:
            # With no free place this still drops cancelled and expired entries from the queue.
            owners = Counter(item.owner for item in self._items.values())
            want = self.scheduler.take(idle=idle, first=first, held=self.held, running=self._shape, owners=owners)
            new = self.queue.take(want)
            if not new:
                return
            self._admit(new)
            if not self.scheduler.fills_before_decoding():
                return
            first = False

    def _admit(self, items: list[WorkItem]) -> None:
        now = time.monotonic()
        for item in items:
            self._items[item.key] = item
            item.started_at = now
            self.metrics.queue_time.observe(now - item.enqueued_at)
        rows = self._rows(items)
        if rows:
            self._bring_in(rows, new=True)

    def _bring_in(self, rows: list[Row], new: bool = False) -> None:
        """Prefill `rows` and merge them into the batch; a failure fails only them. New requests (`new`,
        not parked rows) with `n` > 1 become their n rows here, after one prefill."""
        self._prefilling = sum(r.sampling.choices for r in rows) if new else len(rows)
        try:
            state, logits = self._prefill(rows)
            if new:
                state, logits = fan_out(self.generator, state, logits, self._items)
        except Exception as exc:
            self._fail(self._items_of(rows), exc)
        else:
            self._join(state, logits)
        finally:
            self._prefilling = 0

    def _rows(self, items: list[WorkItem]) -> list[Row]:
        """A request whose row cannot be built (its constraint, its seed) fails alone."""
        rows = []
        for item in items:
            try:
                rows.append(row_of(item))
            except Exception as exc:
                self._fail([item], exc)
        return rows

    def _readmit(self) -> None:
        """Parked rows before any new request (a parked row comes back as its prompt plus what it generated)."""
        lengths = [len(r.input_ids) + len(r.generated) for r in self._preempted]
        chosen = set(self.scheduler.readmit(lengths, self._shape))
        if chosen:
            rows = [r for i, r in enumerate(self._preempted) if i in chosen]
            self._preempted = [r for i, r in enumerate(self._preempted) if i not in chosen]
            self._bring_in(rows)

    def _join(self, state: BatchState, logits: torch.Tensor) -> None:
        """Merge freshly prefilled rows into the running batch. The merge copies the running cache; if
        that runs out of memory the running batch is untouched and the new rows wait, re-prefilled
        once rows have finished."""
        if self._state is None:
            self._state, self._logits = state, logits
            return
        assert self._logits is not None
        try:
            merged = self.generator.merge(self._state, state)
            merged_logits = torch.cat([self._logits, logits])
        except torch.OutOfMemoryError:
            # Their cache goes when this returns; they are prefilled again when there is room.
            self._preempted = state.rows + self._preempted
            self.scheduler.cap.on_oom(self.running)
            log.warning("out of memory merging rows: %d rows wait for room", len(self._preempted))
            return
        except Exception as exc:
            return self._fail(self._items_of(state.rows), exc)
        self._state, self._logits = merged, merged_logits

    def _prefill(self, rows: list[Row]) -> tuple[BatchState, torch.Tensor]:
        tokens = sum(len(r.input_ids) + len(r.generated) for r in rows)
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.batch_fill.observe(min(1.0, tokens / self.config.max_batch_tokens))
        try:
            return self.generator.prefill(rows)
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
        # Split once the `except` is left: until then its traceback holds the failed pass's frames and their
        # tensors (a prefill's keys and values), which empty_cache cannot give back to the retry.
        torch.cuda.empty_cache()
        half = len(rows) // 2
        log.warning("out of memory prefilling %d rows: retrying as %d + %d", len(rows), half, len(rows) - half)
        a, la = self._prefill(rows[:half])
        b, lb = self._prefill(rows[half:])
        return self.generator.merge(a, b), torch.cat([la, lb])

    # -- decoding ------------------------------------------------------------------------------
    def _advance(self) -> None:
        state, logits = self._state, self._logits
        assert state is not None and logits is not None
        self.metrics.batch_size.observe(len(state.rows))
        tokens = self.sampler.step(logits, state.rows)
        keep, finished = self._retire(state.rows, tokens)
        self.metrics.generation_tokens.inc(sum(not isinstance(t, Exception) for t in tokens))
        # The gauge and the state move before any answer leaves, so a client that has its answer never
        # sees its row still running (in /metrics, or in the engine's idle that drain waits for).
        self.metrics.running.set(len(keep) + len(self._preempted))
        if not keep:
            self.generator.select(state, [])  # spent now: the slots cache what the rows leave (prefix caching)
            self._state = self._logits = None
        for item, outcome in finished:
            item.finish(outcome)
        if keep:
            self._step(state, keep, [_token(tokens[i]) for i in keep])

    def _retire(
        self, rows: list[Row], tokens: list[Sampled | Exception]
    ) -> tuple[list[int], list[tuple[WorkItem, Outcome]]]:
        """Record this step's tokens: the indices of the rows that go on, and the answers of requests done."""
        keep: list[int] = []
        finished: list[tuple[WorkItem, Outcome]] = []
        now = time.monotonic()
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            item = self._items[row.key]
            outcome = self.tokens.apply(row, item, token, now)
            if outcome is None:
                keep.append(i)
                continue
            if isinstance(outcome, GenerationResult):  # with n > 1: answered when the last choice ends
                outcome = gather_choices(item, row.index, outcome)
            if outcome is not None:
                finished.append((item, outcome))
        return keep, finished

    def _step(self, state: BatchState, keep: list[int], tokens: list[int]) -> None:
        """One forward pass of the rows at `keep` with their new tokens; out of memory recomputes them."""
        rows = [state.rows[i] for i in keep]
        try:
            if len(rows) < len(state.rows):
                state = self.generator.select(state, keep)
            self.sampler.prefetch(rows)  # grammar masks fill while the forward pass runs
            self._logits = self.generator.step(state, tokens)  # uploaded pinned: the host does not wait
            self._state = state
        except torch.OutOfMemoryError as exc:
            oom = exc.with_traceback(None)  # the failed pass's frames go with the `except` (see `_prefill`)
        except Exception as exc:
            self._state = self._logits = None
            self.generator.release(state)  # its slots free now: the error's traceback may outlive this step
            self._fail(self._items_of(rows), exc)
            return
        else:
            self.scheduler.cap.on_clean_step()
            return
        self.generator.select(state, [])  # its cache slots free now, not when collected: the recompute needs them
        self._preempt(rows, oom)

    def _preempt(self, rows: list[Row], exc: BaseException) -> None:
        """Out of memory mid-decode: drop the cache, re-prefill half the rows now and the rest as room
        frees up (recompute, as vLLM does), and cap the batch at that half for a while."""
        self._state = self._logits = None
        torch.cuda.empty_cache()  # every GPU's cache, not only the current one's: CUDA's allocator empties them all
        if len(rows) == 1:  # one row alone does not fit: nothing to split
            return self._fail(self._items_of(rows), exc)
        rows = still_wanted(rows, self._items)
        if not rows:
            return
        half = max(1, len(rows) // 2)
        self.scheduler.cap.on_oom(half)
        log.warning("out of memory decoding %d rows: recomputing them, at most %d at a time", len(rows), half)
        self._preempted = rows[half:] + self._preempted
        self._bring_in(rows[:half])

    # -- the work items behind the rows --------------------------------------------------------
    def _items_of(self, rows: Iterable[Row]) -> list[WorkItem]:
        return [self._items[row.key] for row in rows]

    def _forget(self) -> None:
        """Keep only the items of rows still held (a new dict: another thread may be reading the old)."""
        held = {row.key for row in (self._state.rows if self._state is not None else []) + self._preempted}
        if len(held) < len(self._items):
            self._items = {key: item for key, item in self._items.items() if key in held}

    # -- failure -------------------------------------------------------------------------------
    def _fail(self, items: list[WorkItem], exc: BaseException) -> None:
        if device_failure(exc) is not None:
            raise exc  # not these rows' failure alone: `_loop` ends the worker
        log.error("batch of %d failed: %s: %s", len(items), type(exc).__name__, exc, exc_info=exc)
        error = InternalError(MODEL_FAILED)
        for item in items:
            item.finish(error)

    def _fail_running(self, error: BaseException) -> None:
        """Everything this worker holds, running or waiting to be recomputed."""
        rows = (self._state.rows if self._state is not None else []) + self._preempted
        for row in rows:
            item = self._items.get(row.key)  # at shutdown the worker thread may still be changing them
            if item is not None:
                item.finish(error)
        self._state = self._logits = None
        self._preempted = []

    def _die(self, reason: str, exc: BaseException) -> None:
        """The device is unusable: answer every request held or queued 503, take no more, tell `on_fatal`."""
        log.critical(
            "the device failed (%s): every request is answered 503; the server must restart", reason, exc_info=exc
        )
        self.on_fatal(reason)  # first: the probes turn unhealthy no later than the first 503 leaves
        self.dead = reason
        self.queue.close()
        error = DeviceFailed(DEVICE_FAILED)
        for item in [*self._items.values(), *self.queue.drain_all()]:
            item.finish(error)
        self._state = self._logits = None
        self._preempted, self._items = [], {}
        self.metrics.running.set(0)
        self.on_tick()

    def fail_all(self, error: BaseException) -> None:
        """At shutdown: answer everything still here."""
        self._fail_running(error)
        for item in self.queue.drain_all():
            item.finish(error)


def _token(sampled: Sampled | Exception) -> int:
    assert isinstance(sampled, Sampled), "only rows that sampled a token go on"
    return sampled.token
