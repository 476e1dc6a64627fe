"""CPU work before the queue, in a pool of prep threads: reading uploads, decoding audio, building prompts.

Nothing here runs on the event loop: unpacking the base64 of a 25 MB file or decoding an mp3 takes
long enough to stall every other connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from app.audio import AudioLimits, decode_audio
from app.config import Settings
from app.errors import ModelNotFound, PayloadTooLarge
from app.model.runtime import ModelRuntime
from app.serving.record import RequestRecord

T = TypeVar("T")
READ_BLOCK = 1 << 20
Read = Callable[[int], Awaitable[bytes]]
"""An upload's `read(size)`: the next block, b"" at the end."""


class Prep:
    def __init__(self, settings: Settings, runtime: ModelRuntime | None) -> None:
        """`runtime`: None for a Voxtral Realtime model (app/serving/streaming.py)."""
        self.settings, self.runtime = settings, runtime
        self._pool = ThreadPoolExecutor(max_workers=settings.prep_threads, thread_name_prefix="voxtral-prep")

    @property
    def model_ids(self) -> set[str]:
        """The names this server answers to: its model id (--served-model-name, else the --model value) and
        the aliases. With --served-model-name the --model value is not one of them (vLLM's behaviour)."""
        s = self.settings
        return {s.model_id, *s.model_aliases}

    def check_model(self, model: str | None) -> None:
        if model and model not in self.model_ids:
            raise ModelNotFound(
                f"The model {model!r} does not exist. This server serves {self.settings.model_id!r}.",
                param="model",
            )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work (audio decoding, prompts, the speech detector) in a prep thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def read_upload(self, read: Read) -> bytes:
        """Read an upload block by block, refusing it (413) as soon as it passes the limit."""
        blocks, size = [], 0
        while block := await read(READ_BLOCK):
            size += len(block)
            self.check_size(size)
            blocks.append(block)
        return b"".join(blocks)

    def check_size(self, size: int) -> None:
        if size > self.settings.max_upload_bytes:
            raise PayloadTooLarge(f"The file is larger than the {self.settings.max_upload_mb:g} MB limit.")

    async def audio(
        self, data: bytes | Callable[[], bytes], filename: str | None, max_seconds: float, record: RequestRecord | None
    ) -> np.ndarray:
        """`data` may be a function that unpacks it (base64 in JSON): it runs in a prep thread with the
        decoding, because unpacking a large upload's base64 would stall the event loop (docs/PERF.md). The
        decoded seconds are added to `record`."""
        audio = await self.run(self._decode, data, filename, AudioLimits(max_seconds=max_seconds))
        if record is not None:
            record.add_audio(audio)
        return audio

    def _decode(self, data: bytes | Callable[[], bytes], filename: str | None, limits: AudioLimits) -> np.ndarray:
        raw = data() if callable(data) else data
        self.check_size(len(raw))
        return decode_audio(raw, limits, filename)
