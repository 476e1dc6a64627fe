"""What the server did for one HTTP request (audio decoded, engine work), for its log line and metrics.

The access-log middleware makes one `RequestRecord` per request; route handlers pass it to the serving
calls that decode audio or queue work, which add to it. Engine work is summed from the tickets' frozen
`TicketStats`, taken when the line is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.audio import SAMPLE_RATE
from app.engine.ticket import Ticket, TicketStats


@dataclass
class RequestRecord:
    audio_seconds: float = 0.0
    """Decoded audio (after resampling, before the model's padding to 30 s windows)."""
    tickets: list[Ticket] = field(default_factory=list)
    decode: Callable[[list[int]], str] | None = None

    def add_audio(self, audio: np.ndarray) -> None:
        self.audio_seconds += audio.shape[0] / SAMPLE_RATE

    def add_tickets(self, tickets: Sequence[Ticket], decode: Callable[[list[int]], str]) -> None:
        """`decode`: token ids -> text without special tokens, for --log-prompts."""
        self.tickets.extend(tickets)
        self.decode = decode

    def stats(self) -> list[TicketStats]:
        return [ticket.stats() for ticket in self.tickets]

    def summary(self) -> dict[str, Any]:
        """Queue wait, run time and token counts summed over the request's engine work."""
        stats = self.stats()
        return {
            "queue_s": round(sum(s.queue_s for s in stats), 4),
            "run_s": round(sum(s.run_s for s in stats), 4),
            "audio_s": round(self.audio_seconds, 3),
            "prompt_tokens": sum(s.prompt_tokens for s in stats),
            "completion_tokens": sum(s.completion_tokens for s in stats),
        }

    def texts(self) -> dict[str, Any]:
        """Prompt and output text (special and audio tokens dropped): only when --log-prompts asks."""
        if self.decode is None or not self.tickets:
            return {}
        stats = self.stats()
        prompts = [self.decode(list(s.prompt_ids)) for s in stats]
        outputs = [self.decode(list(s.output_ids)) for s in stats if s.output_ids is not None]
        return {"prompt": "\n".join(prompts), "output": "\n".join(outputs)}
