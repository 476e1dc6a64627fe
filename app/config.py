"""All settings in one place: CLI flags (`--max-batch-size`) and `VOXTRAL_*` environment variables.

Read once at start-up and injected into `create_app(settings)`; no other module reads the
environment. Each field's docstring is what `--help` and the README show, including the
trade-off it makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TINY_MODEL = "tiny"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VOXTRAL_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="voxtral-server serve",
        extra="ignore",
    )

    # --- model -------------------------------------------------------------------------------
    model: str = TINY_MODEL
    """Checkpoint to serve: a local directory, a Hugging Face hub id (e.g. mistralai/Voxtral-Mini-3B-2507),
    or `tiny` for the built-in random demo model (tests and `make serve`)."""
    served_model_name: str | None = None
    """Model id clients send and /v1/models lists. Defaults to the --model value."""
    model_aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Other model ids accepted as this model (e.g. whisper-1 so unchanged Whisper clients work)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda, cuda:N; with several GPUs `auto` spreads the
    model over them with accelerate's device_map."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bfloat16 on CUDA, float32 on CPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    tiny_seed: int = 0
    """Seed of the random demo model; the same seed gives the same weights."""
    cache_dir: Path = Path.home() / ".cache" / "voxtral-server"
    """Where `--model tiny` is built once and reused."""
    context_length: int = 32768
    """Prompt (audio tokens included) + max_tokens must fit in this; larger requests get a 400."""

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Bearer keys accepted on /v1/*. Empty: no authentication."""

    # --- limits --------------------------------------------------------------------------------
    max_upload_mb: float = 25.0
    """Largest upload or JSON body, checked while reading: bigger is a 413 before it is all in memory."""
    max_transcription_audio_s: float = 1800.0
    """Longest audio for transcription/translation (the model card's 30 minutes)."""
    max_chat_audio_s: float = 2400.0
    """Longest total audio in one chat request (the model card's 40 minutes of understanding)."""
    max_audios_per_request: int = 8
    """Most audio parts in one chat request."""
    transcription_tokens_per_audio_s: float = 8.0
    """New-token budget of a transcription per second of audio (speech runs 3-5 tokens/s); bounds a
    model that never stops."""
    transcription_min_tokens: int = 32
    """Floor of that budget, for very short clips."""
    default_max_tokens: int = 4096
    """max_tokens of a chat request that sets none (capped by what the context leaves)."""

    # --- engine --------------------------------------------------------------------------------
    max_queue: int = 512
    """Requests waiting for the model. Full means 429 at once: a low limit refuses requests instead of
    making them wait too long."""
    max_batch_size: int = 32
    """Rows decoded together. Larger raises throughput until the GPU is saturated, at some latency cost."""
    max_batch_tokens: int = 32768
    """Prompt tokens (audio tokens included) prefilled in one step; bounds activation memory."""
    max_wait_ms: float = 0.0
    """How long a batch may wait to fill up while the model is busy anyway; never while it is idle."""
    request_timeout_s: float = 600.0
    """A request not finished after this long is answered 504 and its row is stopped."""

    @field_validator("api_keys", "model_aliases", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        return self

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
