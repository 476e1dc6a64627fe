"""The engine's configuration: one frozen object, read from the settings once and handed down.

The engine and its worker read it; neither forwards settings one keyword at a time, and nothing changes
it while they run.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings


@dataclass(frozen=True)
class EngineConfig:
    """What the queue, the scheduler and the worker need; each field means what its setting says."""

    max_queue: int
    max_batch_size: int
    max_batch_tokens: int
    max_wait_ms: float
    request_timeout_s: float
    continuous_batching: bool = True
    max_running_tokens: int | None = None
    """None: no budget on the running batch's KV cache (the settings always give one)."""
    max_queued_per_owner: int | None = None
    """Queue places one owner (a client) may hold; None: no cap but the queue's."""
    kv_cache_slots: int | None = None
    """The model's KV cache slots (rows it can hold at once), what `vllm:kv_cache_usage_perc` divides by;
    None: not known (an engine built without a model plan reports a usage of 0)."""

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @classmethod
    def from_settings(cls, settings: Settings, max_rows: int | None = None) -> EngineConfig:
        """`max_rows`: the most rows the model can hold (its KV cache's slots), which caps `max_batch_size`."""
        return cls(
            max_queue=settings.max_queue,
            max_batch_size=min(settings.max_batch_size, max_rows or settings.max_batch_size),
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_ms=settings.max_wait_ms,
            request_timeout_s=settings.request_timeout_s,
            continuous_batching=settings.continuous_batching,
            max_running_tokens=settings.max_running_tokens,
            max_queued_per_owner=settings.max_queued_per_client,
            kv_cache_slots=max_rows,
        )
