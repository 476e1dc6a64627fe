"""Every metric the server exports, by kind: what dashboards, alerts and tests may name."""

from __future__ import annotations

COUNTERS = {
    "voxtral_requests_total",
    "voxtral_prompt_tokens_total",
    "voxtral_generation_tokens_total",
    "voxtral_audio_seconds_total",
    "voxtral_realtime_utterances_total",
    "voxtral_refusals_total",
    "voxtral_encoder_cache_queries_total",
    "voxtral_encoder_cache_hits_total",
    "voxtral_realtime_throttled_seconds_total",
    "voxtral_realtime_throttled_events_total",
    "voxtral_realtime_blank_streams_total",
}
GAUGES = {
    "voxtral_num_requests_waiting",
    "voxtral_num_requests_running",
    "voxtral_model_load_seconds",
    "voxtral_gpu_memory_bytes",
    "voxtral_gpu_memory_peak_bytes",
    "voxtral_realtime_sessions",
    "voxtral_encoder_cache_bytes",
    "voxtral_prefix_cache_bytes",
    "voxtral_realtime_streams",
}
VLLM_GAUGES = {
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
}
"""vLLM's names and meanings (labels `model_name`, `engine`): what a gateway's endpoint picker reads."""
VLLM_COUNTERS = {"vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"}
"""vLLM's prefix cache counters (prompt tokens looked up and found), with its names, meanings and labels."""
VLLM_TWINS = {"vllm:num_requests_waiting", "vllm:num_requests_running"}
"""vLLM series a dashboard shows through their `voxtral_*` twins (the same counts, parked rows placed apart)."""
HISTOGRAMS = {
    "voxtral_e2e_request_latency_seconds",
    "voxtral_time_to_first_token_seconds",
    "voxtral_request_queue_time_seconds",
    "voxtral_batch_size",
    "voxtral_batch_fill_ratio",
    "voxtral_real_time_factor",
    "voxtral_realtime_turn_latency_seconds",
    "voxtral_realtime_tick_rows",
    "voxtral_realtime_tick_seconds",
    "voxtral_realtime_tick_real_time_factor",
}
METRICS = COUNTERS | GAUGES | VLLM_GAUGES | VLLM_COUNTERS | HISTOGRAMS
