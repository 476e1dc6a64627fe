"""What the engine holds at one moment, with vLLM's meanings (`SchedulerStats` in vllm/v1/metrics/stats.py).

Read when /metrics is scraped (app/metrics.py exports it as `vllm:num_requests_waiting`,
`vllm:num_requests_running` and `vllm:kv_cache_usage_perc`), so a gateway's endpoint picker sees the same
numbers it reads from a vLLM pod. A row is a request here as in vLLM's engine core, where `n` > 1 runs as
`n` child requests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerStats:
    num_running_reqs: int
    """Rows in the model's batch: decoding, or being prefilled to join it."""
    num_waiting_reqs: int
    """Requests queued and rows parked after an out-of-memory error (vLLM puts a preempted request back in
    its waiting queue)."""
    kv_cache_usage: float
    """0-1: the KV cache slots held by running rows over the slots the cache was planned with."""
