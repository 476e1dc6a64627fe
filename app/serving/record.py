"""What the server did for one HTTP request (audio decoded, engine work), for its log line and metrics.

The access-log middleware makes one `RequestRecord` per request; route handlers pass it to the serving
calls that decode audio or queue work, which add to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.audio import SAMPLE_RATE
from app.engine.item import WorkItem


@dataclass
class RequestRecord:
    audio_seconds: float = 0.0
    """Decoded audio (after resampling, before the model's padding to 30 s windows)."""
    items: list[WorkItem] = field(default_factory=list)
    decode: Callable[[list[int]], str] | None = None

    def add_audio(self, audio: np.ndarray) -> None:
        self.audio_seconds += audio.shape[0] / SAMPLE_RATE

    def add_items(self, items: list[WorkItem], decode: Callable[[list[int]], str]) -> None:
        """`decode`: token ids -> text without special tokens, for --log-prompts."""
        self.items.extend(items)
        self.decode = decode

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
