"""Where a session's utterances go: the one seam between `Session` (commands, VAD, the audio buffer) and how its
utterances are answered.

Two kinds: `Transcriber` (a Voxtral model: each committed utterance is transcribed whole through the engine's
queue) and `Streamer` (a Voxtral Realtime model: an utterance is a stream fed while its audio arrives). The
session drives every state change through this protocol, in this order for one utterance:
`begin` (speech started, or a manual utterance's first audio), `feed`* (streaming sinks only), then exactly
one of `commit` (its `.completed` or `.failed` follows) or `drop` (nothing follows: cleared, or closed while too
short to commit). At most one utterance is open at a time; `finish` delivers what was committed, `cancel`
drops everything, `release` lets go of the connection.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from app.serving.realtime.config import SessionConfig
from app.serving.transcripts import TranscriptionOptions


class Sink(Protocol):
    streaming: bool
    """True: utterances are fed as their audio arrives (a manual utterance opens at its first audio, and has no
    length limit); False: `commit` gets the utterance's audio whole, and the session's buffer holds it until then."""

    @property
    def unanswered(self) -> int:
        """Utterances committed and not yet answered (the one being fed is not one): a session waiting for them
        is not idle."""

    def accepts(self, config: SessionConfig) -> None:
        """Raise a VoxtralError (its param under `session.`) for a session configuration this sink cannot run."""

    def begin(self, item_id: str, config: SessionConfig, speech: bool) -> None:
        """An utterance opens (`speech`: the session's VAD heard it). RateLimited, InvalidRequest: it did not."""

    def feed(self, samples: np.ndarray) -> None:
        """More of the open utterance's audio (16 kHz float32, never modified afterwards)."""

    def commit(self, item_id: str, audio: np.ndarray, options: TranscriptionOptions) -> None:
        """The open utterance (or, for a whole-turn sink, `audio`) is committed as `item_id`: answer it in turn."""

    def drop(self) -> None:
        """The open utterance is abandoned: nothing is sent for it."""

    async def finish(self) -> None:
        """Answer every committed utterance, then stop (the session drops any open one first)."""

    def cancel(self) -> None:
        """The client is gone: stop answering at once."""

    def release(self) -> None:
        """The session has ended: let go of the connection and of every stream."""
