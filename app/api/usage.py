"""What the server did for one HTTP request (audio decoded, engine work), for its log line and metrics.

The access-log middleware opens a `RequestRecord` in a context variable; the engine and the
service built by `create_app` are thin subclasses that add to it. Route handlers and the
service's own code stay unaware of logging and metrics, and nothing is threaded through
their signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.api.service import Service
from app.audio import SAMPLE_RATE
from app.engine.engine import Engine
from app.engine.work import WorkItem
from app.types import PreparedRequest

CURRENT: ContextVar[RequestRecord | None] = ContextVar("voxtral_request_record", default=None)


@dataclass
class RequestRecord:
    audio_seconds: float = 0.0
    """Decoded audio (after resampling, before the model's padding to 30 s windows)."""
    items: list[WorkItem] = field(default_factory=list)
    decode: Callable[[list[int]], str] | None = None

    def summary(self) -> dict[str, Any]:
        """Queue wait, run time and token counts summed over the request's engine work."""
        queue = run = 0.0
        prompt = completion = 0
        for item in self.items:
            prompt += item.request.prompt_tokens
            if item.result is not None:
                queue += item.result.queue_time_s
                run += item.result.run_time_s
                completion += len(item.result.token_ids)
            elif item.started_at is not None:
                queue += item.started_at - item.enqueued_at
        return {
            "queue_s": round(queue, 4),
            "run_s": round(run, 4),
            "audio_s": round(self.audio_seconds, 3),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
        }

    def texts(self) -> dict[str, Any]:
        """Prompt and output text (special and audio tokens dropped): only when --log-prompts asks."""
        if self.decode is None or not self.items:
            return {}
        prompts = [self.decode(i.request.input_ids) for i in self.items]
        outputs = [self.decode(i.result.token_ids) for i in self.items if i.result is not None]
        return {"prompt": "\n".join(prompts), "output": "\n".join(outputs)}


class ObservedEngine(Engine):
    """Adds every submitted item to the current request's record (none during warm-up)."""

    def submit_many(self, requests: list[PreparedRequest], *, stream: bool = False) -> list[WorkItem]:
        items = super().submit_many(requests, stream=stream)
        record = CURRENT.get()
        if record is not None:
            record.items.extend(items)
            record.decode = self.worker.decode
        return items


class ObservedService(Service):
    """Counts the seconds of every audio the request decodes (uploads and chat audio parts)."""

    async def load_audio(self, *args: Any, **kwargs: Any) -> np.ndarray:
        audio = await super().load_audio(*args, **kwargs)
        record = CURRENT.get()
        if record is not None:
            record.audio_seconds += audio.shape[0] / SAMPLE_RATE
        return audio
