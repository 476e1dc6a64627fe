"""All settings in one place: CLI flags (`--max-batch-size`) and `VOXTRAL_*` environment variables.

Read once at start-up and injected into `app.wiring.Wiring(settings)`; no other module reads the
environment. Settings are grouped by concern, one class each (`ModelSettings`, `ServerSettings`,
`LimitSettings`, `RealtimeSettings`, `ResponsesSettings`, `EngineSettings`), composed into the flat `Settings`
that every reader uses (`settings.max_batch_size`). Each field's docstring is what `--help` and the README show,
including the trade-off it makes; each group's validators check its own fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TINY_MODEL = "tiny"
TINY_REALTIME_MODEL = "tiny-realtime"
"""The random tiny Voxtral Realtime (app/model/tiny.py), built once under --cache-dir like `tiny`."""

_GROUP = SettingsConfigDict(env_prefix="VOXTRAL_", extra="ignore", use_attribute_docstrings=True)
"""Each group alone reads the same environment as `Settings`; attribute docstrings are its help."""


def _split_csv(value: object) -> object:
    """A comma-separated string (how an environment variable spells a list) as that list."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class ModelSettings(BaseSettings):
    """Model: which checkpoint is served, on what device, and how long a request may be."""

    model_config = _GROUP

    model: str = TINY_MODEL
    """Checkpoint to serve: a local directory, a Hugging Face hub id (e.g. mistralai/Voxtral-Mini-3B-2507),
    or `tiny` for the built-in random demo model (tests and `make serve`); `tiny-realtime` for a random tiny
    Voxtral Realtime."""
    served_model_name: str | None = None
    """Model id clients send and /v1/models lists. Defaults to the --model value."""
    model_aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Other model ids accepted as this model (e.g. whisper-1 so unchanged Whisper clients work)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda, cuda:N. auto and cuda place the whole model on GPU 0;
    with several GPUs it is spread over them only with --device-map auto (a checkpoint whose weights do not fit
    GPU 0 is refused at start-up, saying so)."""
    device_map: Literal["auto"] | None = None
    """auto: spread the model over every visible GPU, layer by layer (transformers' device_map="auto": one GPU
    computes at a time, each step pays accelerate's hooks), for a checkpoint that does not fit one GPU. Unset:
    one GPU. The choice and each GPU's memory are logged at start-up."""
    tensor_parallel_size: int = 1
    """Ranks the decoder is sharded over (vLLM's flag): this process is rank 0 and serves HTTP; it starts N-1
    worker processes itself (no torchrun), one GPU each with NCCL (cuda:0..N-1), or CPU processes over gloo
    where no GPU is visible (transformers puts shards on one that is: --device cpu is refused there).
    transformers' tensor-parallel plan shards the decoder's projections, embedding and KV cache by head; the
    audio encoder, projector and head are replicated. Every rank steps the same batch; CUDA graphs are off.
    A rank that exits or hangs stops the server; Voxtral Realtime is refused. Excludes --device-map auto."""
    tensor_parallel_timeout_s: float = 60.0
    """Once loaded, how long a rank waits for the others in a collective, and rank 0 for a follower's answer
    after its own part of a step (--tensor-parallel-size > 1): the ranks meet in every collective, so a longer
    wait is a rank that hung or failed alone, and the server stops saying so. Loading waits up to 10 minutes."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bfloat16 on CUDA, float32 on CPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers. A Voxtral Realtime checkpoint runs with sdpa only (others are
    refused at start-up)."""
    tiny_seed: int = 0
    """Seed of the random demo model; the same seed gives the same weights."""
    cache_dir: Path = Path.home() / ".cache" / "voxtral-server"
    """Where `--model tiny` is built once and reused."""
    context_length: int = 32768
    """Prompt (audio tokens included) + max_tokens must fit in this; larger requests get a 400. Each row's KV
    cache slot holds this many positions, allocated up front: longer fits fewer rows in the same memory."""

    quantization: Literal["none", "int8", "bitsandbytes", "fp8"] = "none"
    """Weight format of the language model's linear layers, quantized at load (vLLM's flag): int8 (torchao
    weight-only int8, CPU or GPU), bitsandbytes (4-bit NF4), fp8 (CUDA, compute capability 8.9 or newer). The
    audio encoder, projector, embedding and head stay in --dtype. A checkpoint saved quantized loads as it is.
    Fewer weight bytes leave more memory to the KV cache; each format rounds the weights (README, "Memory")."""

    @field_validator("model_aliases", mode="before")
    @classmethod
    def _split_aliases(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _check_parallel(self) -> Self:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.tensor_parallel_timeout_s <= 0:
            raise ValueError("tensor_parallel_timeout_s must be greater than 0")
        if self.tensor_parallel_size > 1 and self.device_map is not None:
            raise ValueError("tensor_parallel_size and device_map are exclusive: a rank holds one device")
        if self.tensor_parallel_size > 1 and self.quantization != "none":
            # the quantized step runs each module's own forward, which transformers' plan already all-reduces
            raise ValueError("tensor_parallel_size > 1 and quantization are exclusive: not sharded quantized yet")
        return self

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model


class ServerSettings(BaseSettings):
    """Server: the HTTP listener and its connection limits, authentication, shutdown and logging."""

    model_config = _GROUP

    # HTTP
    host: str = "127.0.0.1"
    """Address to bind. 0.0.0.0 listens on every interface (containers); with no API key that logs a warning."""
    port: int = 8000
    max_connections: int = 1024
    """Open connections (idle keep-alive ones included) before new requests get a 503 (too_many_connections,
    with Retry-After, and the connection closed). Bounds the file descriptors and memory a flood of clients can
    take; keep it above max_queue so the queue's 429 comes first."""
    keep_alive_timeout_s: float = 30.0
    """An idle keep-alive connection is closed after this. Higher saves reconnects but holds connection slots;
    behind a load balancer keep it above the balancer's idle timeout, or it may reuse a just-closed connection."""
    header_read_timeout_s: float = 10.0
    """A request's headers must all arrive within this of its first byte (or of the connection opening); slower
    is a 408 and a closed connection. Low cuts slow-loris clients sooner, too low fails clients on bad links."""
    body_read_timeout_s: float = 120.0
    """A request's whole body must arrive within this of the request starting; slower is a 408 and a closed
    connection. 120 s lets a 25 MB upload through at ~1.7 Mbit/s; lower frees slots from slow clients sooner."""
    playground: bool = True
    """Serve the browser playground at GET / (transcribe a file or the microphone, ask about it, live
    transcription): static files calling /v1/* with the user's key. Off (--no-playground): / is a 404."""

    # auth
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    """Bearer keys accepted on /v1/* (comma-separated in VOXTRAL_API_KEYS). None here or in --api-key-file:
    no authentication. Prefer the file: flags and env vars show up in `ps` and `docker inspect`."""
    api_key_file: Path | None = None
    """File of bearer keys, one per line (blank lines and # comments ignored), added to --api-keys. Read once at
    start-up: restart to rotate keys. Mount it from a secret."""
    metrics_require_key: bool = False
    """Also require a key on /metrics. Off: Prometheus scrapes without credentials (keep the port private)."""

    # lifecycle
    drain_timeout_s: float = 30.0
    """After SIGTERM, how long accepted requests get to finish (new ones get 503 meanwhile) before the rest are
    cut off. Longer lets long transcriptions finish; the orchestrator's grace period must exceed it."""

    # logging
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level logged. info logs one line per request."""
    log_format: Literal["json", "text"] = "json"
    """json: one JSON object per line, for log collectors; text: for a terminal."""
    log_prompts: bool = False
    """Add each request's prompt and output text to its log line. Debugging only: it puts user content in logs
    (audio never is)."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_server(self) -> Self:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        timeouts = ("keep_alive_timeout_s", "header_read_timeout_s", "body_read_timeout_s")
        for name in timeouts:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must not be negative")
        return self


class LimitSettings(BaseSettings):
    """Limits: the most one request may upload, carry as audio and generate."""

    model_config = _GROUP

    max_upload_mb: float = 25.0
    """Largest upload or JSON body, checked while reading: bigger is a 413 before it is all in memory."""
    max_transcription_audio_s: float = 1800.0
    """Longest audio for transcription/translation (the model card's 30 minutes)."""
    max_chat_audio_s: float = 2400.0
    """Longest total audio in one chat request (the model card's 40 minutes of understanding). The lengths the
    parts' headers declare are added up before any part is decoded; each then decodes within what is left."""
    max_audios_per_request: int = 8
    """Most audio parts in one chat request."""
    transcription_tokens_per_audio_s: float = 8.0
    """New-token budget of a transcription per second of audio (speech runs 3-5 tokens/s); bounds a
    model that never stops."""
    transcription_min_tokens: int = 32
    """Floor of that budget, for very short clips."""
    default_max_tokens: int = 4096
    """max_tokens of a chat request that sets none (capped by what the context leaves)."""

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class RealtimeSettings(BaseSettings):
    """Realtime: transcription sessions over the WebSocket at /v1/realtime."""

    model_config = _GROUP

    realtime_max_sessions: int = 100
    """Realtime transcription sessions open at once; one more is refused at the upgrade (429 too_many_sessions).
    Each open session holds a socket, its uncommitted audio (up to realtime_max_utterance_s) and a detector
    state; their utterances share the queue with HTTP requests."""
    realtime_max_utterance_s: float = 30.0
    """Longest utterance: audio buffered this long without a turn end (or a manual commit) is committed where it
    is and, if speech goes on, the next utterance starts there. 30 s is Voxtral's window: one model call each."""
    realtime_max_buffer_s: float = 60.0
    """Most uncommitted audio a session holds. An append is measured from its length before it is decoded (the
    input formats are raw); one that would take the buffer past this gets an error event (audio_too_long) and is
    dropped, and the session goes on. At least realtime_max_utterance_s: the buffer is committed at that length."""
    realtime_idle_timeout_s: float = 120.0
    """A session that sends nothing for this long is closed (its committed utterances are answered first)."""
    realtime_max_message_mb: float = 1.0
    """Largest client event. Bigger ones get an error event; over this plus 64 KiB the socket is closed with 1009
    before the message is read whole. 1 MB of base64 is ~16 s of 24 kHz PCM: clients send 20-100 ms chunks."""
    realtime_max_pending_events: int = 256
    """Server events waiting for a slow client. When full, the session stops reading the client (which then
    cannot send faster than it reads) and decoding for it waits: memory stays bounded whatever the client does."""
    realtime_max_pending_mb: float = 2.0
    """The same events in bytes: a client that leaves more than this unread is closed with 1008 (`slow reader`),
    whatever the events' sizes. Bounds a session's outbox at --realtime-max-sessions times this."""

    realtime_max_events_per_s: float = 200.0
    """Client events one session may send per second, sustained (a token bucket, refilled at this rate). Past it
    the server stops reading that session's socket until the bucket refills: TCP back-pressure slows the client
    down, nothing is refused and no event is lost, and a flood costs the server nothing beyond the events it
    reads. A client streaming 20 ms chunks sends 50 appends/s (10 ms: 100); commits and updates are rare."""
    realtime_events_burst: int = 400
    """Events a session may send at once above that rate (the bucket's size): 8 s of 20 ms chunks, which a
    client that reconnects or was held up by its network sends back to back."""

    realtime_max_pending_utterances: int = 4
    """Utterances of one session committed and not yet answered. A commit past this is answered at once with
    `conversation.item.input_audio_transcription.failed` (code `rate_limit_exceeded`) instead of queueing: a
    session that commits faster than it is answered cannot take the queue from the others. Speech in real time
    has one or two pending."""
    realtime_max_session_s: float = 3600.0
    """Longest a realtime session may last (OpenAI's sessions end at 60 minutes). Reached, the session gets an
    `error` event (code `session_expired`), its committed utterances are answered, and it is closed (1001, as
    OpenAI closes it)."""
    realtime_max_streams: int = 32
    """Voxtral Realtime models only: streams decoded at once (realtime utterances and HTTP transcriptions in
    progress), each a slot of caches allocated at start-up. One tick steps all of them in one forward. A new
    utterance past this gets an `error` event (a transcription: 429) until one ends, and sessions are capped at
    it. Fewer when the KV budget (--kv-cache-memory-bytes, --gpu-memory-utilization) holds fewer: Mini-Realtime
    takes about 1 GiB a stream in bf16 (the count and the bytes are logged at start-up)."""
    realtime_tick_interval_ms: float = 40.0
    """Voxtral Realtime models only: the shortest time between two ticks' starts while streams are due, so every
    stream due within it is stepped in the same forward (rows a tick, not ticks, set a GPU's cost: each tick
    reads the weights once). Adds at most this to a token's latency; a stream that fell behind (or flushes)
    ticks at once. 0: tick as soon as any stream is due."""
    realtime_blank_speech_s: float = 10.0
    """Voxtral Realtime models only: a stream that emits no text over this much audio the speech detector hears
    as speech is logged and counted (`voxtral_realtime_blank_streams_total`): the model's blank-token rut. Only
    sessions with server_vad or semantic_vad are watched (with `turn_detection: null` no detector runs)."""

    @model_validator(mode="after")
    def _check_realtime(self) -> Self:
        if self.realtime_max_sessions < 0 or self.realtime_max_pending_events < 1:
            raise ValueError("realtime_max_sessions must be at least 0 and realtime_max_pending_events at least 1")
        if self.realtime_max_pending_utterances < 1:
            raise ValueError("realtime_max_pending_utterances must be at least 1")
        if self.realtime_max_events_per_s <= 0 or self.realtime_events_burst < 1:
            raise ValueError("realtime_max_events_per_s must be greater than 0 and realtime_events_burst at least 1")
        if not 1.0 <= self.realtime_max_utterance_s <= 30.0:
            raise ValueError("realtime_max_utterance_s must be between 1 and 30 (Voxtral's window)")
        if self.realtime_max_session_s <= 0 or self.realtime_max_streams < 1 or self.realtime_blank_speech_s <= 0:
            raise ValueError(
                "realtime_max_session_s and realtime_blank_speech_s must be greater than 0, "
                "realtime_max_streams at least 1"
            )
        if self.realtime_max_buffer_s < self.realtime_max_utterance_s:
            raise ValueError("realtime_max_buffer_s must be at least realtime_max_utterance_s")
        if not 0 <= self.realtime_tick_interval_ms <= 1000:
            raise ValueError("realtime_tick_interval_ms must be between 0 and 1000")
        if self.realtime_idle_timeout_s <= 0 or self.realtime_max_message_mb <= 0 or self.realtime_max_pending_mb <= 0:
            raise ValueError(
                "realtime_idle_timeout_s, realtime_max_message_mb and realtime_max_pending_mb must be greater than 0"
            )
        return self

    @property
    def realtime_max_message_bytes(self) -> int:
        return int(self.realtime_max_message_mb * 1024 * 1024)

    @property
    def realtime_max_pending_bytes(self) -> int:
        return int(self.realtime_max_pending_mb * 1024 * 1024)


class ResponsesSettings(BaseSettings):
    """Responses: where /v1/responses keeps stored responses (`store: true`, OpenAI's default) for GET and for
    follow-ups that name a `previous_response_id`, and for how long."""

    model_config = _GROUP

    responses_db: Path | None = None
    """SQLite file of stored responses (created if missing). Default: `responses.sqlite3` under --cache-dir.
    `:memory:` keeps them only until the server stops. Each response keeps its input as sent, audio included."""
    responses_max_age_h: float = 720.0
    """Stored responses older than this are gone (30 days, as OpenAI keeps them). Shorter keeps less user
    content, audio included, on disk; a follow-up naming an expired response gets a 400."""
    responses_max_stored: int = 10000
    """Most stored responses; past it the oldest are dropped first."""
    responses_max_db_mb: float = 2048.0
    """Most megabytes of stored input and output (audio as sent, base64); past it the oldest are dropped first.
    One request may carry up to --max-upload-mb of audio, so this bounds the disk a flood of them can take."""

    @model_validator(mode="after")
    def _check_responses(self) -> Self:
        if self.responses_max_age_h <= 0 or self.responses_max_stored < 1 or self.responses_max_db_mb <= 0:
            raise ValueError("responses_max_age_h and responses_max_db_mb must be > 0, responses_max_stored >= 1")
        return self


class EngineSettings(BaseSettings):
    """Engine: the queue, how rows are batched, and the threads the work runs on."""

    model_config = _GROUP

    max_queue: int = 512
    """Requests waiting for the model. Full means 429 at once: a low limit refuses requests instead of
    making them wait too long."""
    max_queued_per_client: int = 256
    """Queue places one client may hold at once: an API key (by a hash of it), or a client address when no key
    is configured, its realtime sessions' utterances included. More is a 429 `rate_limit_exceeded` (with
    Retry-After; for an utterance, a `.failed` event with that code) while the others still have room. A client
    with nothing queued may always queue one request, however many pieces a long file makes. Waiting requests
    join the batch round-robin across clients, and across one client's realtime sessions, whatever this is."""
    max_batch_size: int = 32
    """Rows decoded together. Larger raises throughput until the GPU is saturated, at some latency cost. Capped
    at the KV cache slots that fit (--kv-cache-memory-bytes, --gpu-memory-utilization; logged at start-up)."""
    max_batch_tokens: int = 32768
    """Prompt tokens (audio tokens included) prefilled in one step; bounds activation memory. Running rows
    take a decode step between prefills, so a smaller budget also shortens their stalls. On a CPU a few rows of
    audio a prefill (3200: 8 rows of 30 s) beat larger budgets, whose prefills run the audio encoder out of
    cache (docs/PERF.md)."""
    max_running_tokens: int = 131072
    """Rows x longest row (prompt, audio and output so far) the running batch may hold when a request joins
    it: the KV cache each decode step reads, padding included (each row then grows by a token a step). When
    the oldest waiting request would not fit (a long audio among short rows), nothing joins until the batch
    has drained enough, so it runs next. Lower bounds per-step cost; too low keeps batches small. The cache's
    memory is allocated at start-up whatever this is (--gpu-memory-utilization). A request always runs alone."""
    max_wait_ms: float = 0.0
    """How long a batch may wait to fill up while the model is busy anyway; never while it is idle."""
    continuous_batching: bool = True
    """Prefill waiting requests into the running batch between decode steps, and give a finished row's place
    to the next request at once. Off (--no-continuous-batching): static batching, as a loop around
    model.generate does: a batch takes no one in until its last row finishes, so running rows never pause for
    a prefill, but new requests wait for the slowest row and finished rows leave their places empty."""
    request_timeout_s: float = 600.0
    """A request not finished after this long is answered 504 and its row is stopped."""
    prep_threads: int = 2
    """Threads that decode audio and tokenize prompts before the queue. More keeps a fast GPU fed from many
    uploads; on a small CPU they compete with the model worker for cores."""
    gpu_memory_utilization: float = 0.9
    """Fraction of each GPU's memory this server may use: weights, activations and the KV cache, which gets what
    the weights and a prefill's activations (sized from --max-batch-tokens) leave. Higher fits more rows of
    --context-length; lower leaves room for other processes on the GPU. Ignored on a CPU."""
    kv_cache_memory_bytes: int | None = None
    """KV cache size in bytes, on any device, instead of what --gpu-memory-utilization leaves (unset on a CPU:
    the machine's RAM, touched only as far as the decode steps read). It is --max-batch-size slots of
    --context-length positions at most, allocated at start-up; a budget that holds fewer caps the rows decoded
    at once, one that holds none stops the start-up. Under --tensor-parallel-size, each rank's (vLLM: per GPU)."""
    encoder_cache_memory_bytes: int = 256 * 2**20
    """Audio encoder outputs kept for reuse, in bytes on the model's device (0: off): a recording sent again (a
    follow-up question about it, the same file transcribed twice) skips the audio encoder. About 110 windows of
    30 s for Voxtral Mini in bfloat16, 80 for Small; taken from the KV cache's share of the GPU."""
    enable_prefix_caching: bool = True
    """Keep a finished request's KV cache in its free slot, keyed by its tokens (audio by its samples), so a
    later prompt that starts the same way (the same tool definitions, the earlier turns of a conversation, the
    same recording) prefills only the rest (vLLM's automatic prefix caching; `cache_salt` keeps a tenant's
    prefixes its own). Cached prefixes only use slots no running row holds, least recently used given up
    first. Off (--no-enable-prefix-caching): every prompt prefills from its first token."""
    enforce_eager: bool = False
    """Never capture CUDA graphs: every decode step runs eagerly, paying the host a launch per kernel (slower
    per token, most at small batches), for a faster start-up and the graphs' memory. No effect on a CPU."""
    torch_threads: int = 0
    """torch intra-op CPU threads (0: torch's default, one per core). Fewer leave cores to HTTP and audio work
    but slow the model more (docs/PERF.md, "Settings defaults"). GPU serving hardly uses them."""

    @model_validator(mode="after")
    def _check_engine(self) -> Self:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_queue < 1 or self.max_queued_per_client < 1:
            raise ValueError("max_queue and max_queued_per_client must be at least 1")
        if self.max_batch_tokens < 1 or self.max_running_tokens < 1:
            raise ValueError("max_batch_tokens and max_running_tokens must be at least 1")
        if self.prep_threads < 1 or self.torch_threads < 0:
            raise ValueError("prep_threads must be at least 1 and torch_threads at least 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be greater than 0 and at most 1")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be at least 1")
        if self.encoder_cache_memory_bytes < 0:
            raise ValueError("encoder_cache_memory_bytes must be at least 0")
        return self


GROUPS: tuple[type[BaseSettings], ...] = (
    ModelSettings,
    ServerSettings,
    LimitSettings,
    RealtimeSettings,
    ResponsesSettings,
    EngineSettings,
)
"""The groups in the order `--help` and the README list them."""


# Every setting, flat: `settings.<field>` whatever its group, and every group's validators run. The bases
# are listed in reverse of `GROUPS` because pydantic collects fields from the last base first. No
# docstring: pydantic-settings would print it at the top of `serve --help`.
class Settings(EngineSettings, ResponsesSettings, RealtimeSettings, LimitSettings, ServerSettings, ModelSettings):
    model_config = SettingsConfigDict(
        env_prefix="VOXTRAL_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="voxtral-server serve",
        extra="ignore",
        use_attribute_docstrings=True,
    )

    @property
    def env_vars(self) -> list[str]:
        return [f"VOXTRAL_{name.upper()}" for name in type(self).model_fields]


VLLM_FLAGS: dict[str, str] = {
    "--api-key": "--api-keys",
    "--max-num-seqs": "--max-batch-size",
    "--max-num-batched-tokens": "--max-batch-tokens",
    "--max-model-len": "--context-length",
    "--gpu-memory-utilization": "--gpu-memory-utilization",
    "--kv-cache-memory-bytes": "--kv-cache-memory-bytes",
    "--enforce-eager": "--enforce-eager",
    "--enable-prefix-caching": "--enable-prefix-caching",
    "--no-enable-prefix-caching": "--no-enable-prefix-caching",
    "--quantization": "--quantization",
}
"""vLLM's spellings of flags that mean the same here, so a `vllm serve` command line carries over (those spelled
alike are listed too: their snake case is vLLM's as well)."""
VLLM_IGNORED = frozenset({"--tokenizer-mode", "--config-format", "--load-format"})
"""vLLM flags Voxtral's model card asks for (`mistral` each): this server always reads Mistral's formats."""


def cli_args(argv: list[str]) -> list[str]:
    """`argv` with vLLM's spellings (snake or kebab case, `--flag value` or `--flag=value`) in ours."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name, eq, value = arg.partition("=")
        vllm = name.replace("_", "-") if name.startswith("--") else name
        if vllm in VLLM_IGNORED:
            skip = not eq  # its value is the next argument
            continue
        out.append(VLLM_FLAGS.get(vllm, name) + eq + value)
    return out


def settings_markdown() -> str:
    """The README's settings tables, one per group, generated so they cannot drift from the code (a test
    compares them)."""
    return "\n\n".join(_group_markdown(group) for group in GROUPS)


def _group_markdown(group: type[BaseSettings]) -> str:
    title, _, about = (group.__doc__ or "").partition(": ")
    rows = [f"### {title}", "", about[:1].upper() + about[1:].strip(), ""]
    rows += ["| flag | env var | default | what it does and trades off |", "| --- | --- | --- | --- |"]
    rows += [_field_row(name, field) for name, field in group.model_fields.items()]
    return "\n".join(rows)


def _field_row(name: str, field: FieldInfo) -> str:
    default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
    shown = "none" if default in (None, []) else str(default).replace(str(Path.home()), "~")
    text = " ".join((field.description or "").split())
    flag, env = "--" + name.replace("_", "-"), f"VOXTRAL_{name.upper()}"
    return f"| `{flag}` | `{env}` | `{shown}` | {text} |"


if __name__ == "__main__":
    print(settings_markdown())
