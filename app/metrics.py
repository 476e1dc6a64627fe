"""Prometheus instruments, on a registry passed in so several apps can live in one process (tests).

Names mirror vLLM's where a meaning exists there (`vllm:num_requests_waiting` ->
`voxtral_num_requests_waiting`, same units), so dashboards and autoscalers translate. Three series carry
vLLM's own names and meanings too (`watch_scheduler`): those a Gateway API Inference Extension endpoint
picker reads from each pod.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class CacheCounts(Protocol):
    """What a cache says of itself (the audio encoder cache's `stats()`)."""

    @property
    def queries(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def bytes(self) -> int: ...


class _CacheCollector(Collector):
    """The audio encoder cache's counts, read when /metrics is scraped (the cache keeps them; no second copy)."""

    def __init__(self, counts: Callable[[], CacheCounts]) -> None:
        self.counts = counts

    def collect(self) -> Iterable[Metric]:
        now = self.counts()
        yield CounterMetricFamily("voxtral_encoder_cache_queries", "Audios looked up in the encoder cache", now.queries)
        yield CounterMetricFamily("voxtral_encoder_cache_hits", "Audios whose encoder output was reused", now.hits)
        yield GaugeMetricFamily("voxtral_encoder_cache_bytes", "Bytes the audio encoder cache holds", now.bytes)


class PrefixCounts(Protocol):
    """What the prefix cache says of itself (`BatchGenerator.prefix_stats()`): tokens since start, bytes now."""

    @property
    def queries(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def cached_bytes(self) -> int: ...


class _PrefixCollector(Collector):
    """vLLM's prefix cache counters, with its names, help texts and labels (as `_SchedulerCollector`'s), and the
    bytes cached prefixes hold, read from the generator when /metrics is scraped. No `voxtral_*` twins of the
    counters: nothing here counted them before, so one name serves dashboards and cache-aware routers alike."""

    def __init__(self, counts: Callable[[], PrefixCounts], model_name: str) -> None:
        self.counts, self.labels = counts, {"model_name": model_name, "engine": "0"}

    def collect(self) -> Iterable[Metric]:
        now = self.counts()
        series = (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", now.queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", now.hits),
        )
        for name, help_text, value in series:
            family = CounterMetricFamily(name, help_text, labels=list(self.labels))
            family.add_metric(list(self.labels.values()), value)
            yield family
        help_text = "Bytes of KV cache that cached prompt prefixes hold (in slots no running row holds)"
        yield GaugeMetricFamily("voxtral_prefix_cache_bytes", help_text, now.cached_bytes)


class SchedulerCounts(Protocol):
    """What the engine holds at one moment (app/engine/stats.py `SchedulerStats`), with vLLM's meanings."""

    @property
    def num_running_reqs(self) -> int: ...
    @property
    def num_waiting_reqs(self) -> int: ...
    @property
    def kv_cache_usage(self) -> float: ...


class _SchedulerCollector(Collector):
    """vLLM's scheduler gauges, with its names, help texts and labels (`model_name`, `engine`: one engine
    here, "0"), read from the engine when /metrics is scraped: what a gateway's endpoint picker reads from a
    vLLM pod. Before the engine exists (`counts` gives None) nothing waits or runs: zeros, as vLLM seeds them."""

    def __init__(self, counts: Callable[[], SchedulerCounts | None], model_name: str) -> None:
        self.counts, self.labels = counts, {"model_name": model_name, "engine": "0"}

    def collect(self) -> Iterable[Metric]:
        now = self.counts()
        values = (now.num_running_reqs, now.num_waiting_reqs, now.kv_cache_usage) if now is not None else (0, 0, 0)
        series = (
            ("vllm:num_requests_running", "Number of requests in model execution batches."),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
        )
        for (name, help_text), value in zip(series, values, strict=True):
            family = GaugeMetricFamily(name, help_text, labels=list(self.labels))
            family.add_metric(list(self.labels.values()), value)
            yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # as vLLM does: `*_created` series double the cardinality and no dashboard reads them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("voxtral_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.e2e_latency = Histogram(
            "voxtral_e2e_request_latency_seconds",
            "Arrival to last byte",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "voxtral_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_time = Histogram(
            "voxtral_request_queue_time_seconds", "Time waiting in the queue", buckets=_LATENCY, registry=r
        )
        self.waiting = Gauge("voxtral_num_requests_waiting", "Requests in the queue (autoscaling signal)", registry=r)
        self.running = Gauge(
            "voxtral_num_requests_running",
            "Requests the model holds: decoding, being prefilled, or parked after an out-of-memory error",
            registry=r,
        )
        self.batch_size = Histogram(
            "voxtral_batch_size",
            "Rows per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_fill = Histogram(
            "voxtral_batch_fill_ratio",
            "Prefill tokens / token budget",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        self.prompt_tokens = Counter("voxtral_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("voxtral_generation_tokens", "Tokens generated", registry=r)
        self.audio_seconds = Counter("voxtral_audio_seconds", "Seconds of audio processed", registry=r)
        self.rtf = Histogram(
            "voxtral_real_time_factor",
            "Processing time / audio duration per request",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=r,
        )
        self.model_load_seconds = Gauge("voxtral_model_load_seconds", "Time to load the model", registry=r)
        self.gpu_memory = Gauge(
            "voxtral_gpu_memory_bytes", "GPU memory allocated by PyTorch tensors", ["device"], registry=r
        )
        self.gpu_memory_peak = Gauge(
            "voxtral_gpu_memory_peak_bytes",
            "Most GPU memory PyTorch tensors have held at once since start (headroom before out-of-memory)",
            ["device"],
            registry=r,
        )

        self.refusals = Counter(
            "voxtral_refusals",
            "Requests and realtime utterances refused before they ran, by reason (queue_full, client_queued, "
            "session_pending)",
            ["reason"],
            registry=r,
        )
        self.realtime_sessions = Gauge("voxtral_realtime_sessions", "Realtime (WebSocket) sessions open", registry=r)
        self.realtime_utterances = Counter(
            "voxtral_realtime_utterances", "Realtime utterances answered, by outcome", ["outcome"], registry=r
        )
        self.realtime_throttled_seconds = Counter(
            "voxtral_realtime_throttled_seconds",
            "Seconds realtime sessions' sockets were left unread because their client sent events faster than "
            "--realtime-max-events-per-s (summed over sessions)",
            registry=r,
        )
        self.realtime_throttled_events = Counter(
            "voxtral_realtime_throttled_events",
            "Realtime client events after which a session's socket was left unread a while (its client was past "
            "--realtime-max-events-per-s)",
            registry=r,
        )
        self.realtime_turn_latency = Histogram(
            "voxtral_realtime_turn_latency_seconds",
            "Realtime: speech_stopped (or the commit) to the transcription's .completed",
            buckets=_LATENCY,
            registry=r,
        )
        self.realtime_streams = Gauge(
            "voxtral_realtime_streams",
            "Voxtral Realtime: streams being decoded (live utterances and HTTP transcriptions), of "
            "--realtime-max-streams",
            registry=r,
        )
        self.realtime_tick_rows = Histogram(
            "voxtral_realtime_tick_rows",
            "Voxtral Realtime: streams one tick stepped (each a token)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.realtime_tick_seconds = Histogram(
            "voxtral_realtime_tick_seconds",
            "Voxtral Realtime: time of one tick (every stream with a new 80 ms frame, one token each)",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
            registry=r,
        )
        self.realtime_tick_rtf = Histogram(
            "voxtral_realtime_tick_real_time_factor",
            "Voxtral Realtime: a tick's time over the 80 ms of audio it decodes per stream (over 1: falling behind)",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0),
            registry=r,
        )
        self.realtime_blank_streams = Counter(
            "voxtral_realtime_blank_streams",
            "Voxtral Realtime: streams that emitted no text over --realtime-blank-speech-s of audio the speech "
            "detector heard as speech (the blank-token rut)",
            registry=r,
        )

    def watch_encoder_cache(self, counts: Callable[[], CacheCounts]) -> None:
        """Export the audio encoder cache's counts (`voxtral_encoder_cache_{queries,hits}_total`, `_bytes`)."""
        self.registry.register(_CacheCollector(counts))

    def watch_prefix_cache(self, counts: Callable[[], PrefixCounts], model_name: str) -> None:
        """Export the prefix cache's `vllm:prefix_cache_{queries,hits}_total` (vLLM's meanings: prompt tokens
        looked up and found) and `voxtral_prefix_cache_bytes`, labelled as `watch_scheduler`'s series."""
        self.registry.register(_PrefixCollector(counts, model_name))

    def watch_scheduler(self, counts: Callable[[], SchedulerCounts | None], model_name: str) -> None:
        """Export the engine's `vllm:num_requests_{waiting,running}` and `vllm:kv_cache_usage_perc` (vLLM's
        meanings; the `voxtral_*` gauges keep theirs), labelled with the served model's name."""
        self.registry.register(_SchedulerCollector(counts, model_name))

    def sample_gpu_memory(self) -> None:
        """Called at scrape time: a value read when Prometheus asks is never stale. No GPU: no series."""
        import torch  # already loaded by the model; imported here so this module stays light

        if not torch.cuda.is_available():
            return
        for index in range(torch.cuda.device_count()):
            self.gpu_memory.labels(f"cuda:{index}").set(torch.cuda.memory_allocated(index))
            self.gpu_memory_peak.labels(f"cuda:{index}").set(torch.cuda.max_memory_allocated(index))
