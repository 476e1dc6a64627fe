"""A chat request's audio parts: counted, then measured from their headers, then decoded within the budget.

Compressed audio is small on the wire and large once decoded (40 minutes of FLAC silence is 120 KB, and
150 MB as samples), so a request's limits are checked in the order that costs least: the number of parts
from the request body; the total length their headers declare, part by part, before any part is decoded;
and what is left of `max_chat_audio_s` while each part decodes, which stops a file whose header declares no
length (or lies) at the budget. A refusal names the part (`messages[i].content[j].input_audio`) where it
happened; no part after it is unpacked or decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np

from app.audio import SAMPLE_RATE, declared_seconds
from app.config import Settings
from app.errors import AudioTooLong, InvalidRequest, VoxtralError
from app.serving import chat_request
from app.serving.prep import Prep
from app.serving.record import RequestRecord
from app.serving.schemas import AudioUrlPart, ChatCompletionRequest, InputAudioPart

PartKey = tuple[int, int]
"""(message index, content part index)."""


@dataclass(frozen=True)
class AudioPart:
    """One audio content part of a request, not yet unpacked."""

    key: PartKey
    field: str
    """"input_audio" or "audio_url"."""
    unpack: Callable[[], bytes]
    """The part's bytes from its base64 (raises AudioDecodeError / InvalidRequest)."""

    @property
    def param(self) -> str:
        return f"messages[{self.key[0]}].content[{self.key[1]}].{self.field}"


def audio_parts(body: ChatCompletionRequest, settings: Settings) -> list[AudioPart]:
    """Every audio part, in order; more than `max_audios_per_request` is refused before any is read."""
    parts = list(_parts(body))
    if len(parts) > settings.max_audios_per_request:
        raise InvalidRequest(
            f"{len(parts)} audio parts in one request; the limit is {settings.max_audios_per_request}.",
            param="messages",
        )
    return parts


def _parts(body: ChatCompletionRequest) -> Iterator[AudioPart]:
    for m, message in enumerate(body.messages):
        for p, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if isinstance(part, InputAudioPart):
                raw = part.input_audio if isinstance(part.input_audio, str) else part.input_audio.data
                yield AudioPart((m, p), "input_audio", partial(chat_request.b64_audio, raw))
            elif isinstance(part, AudioUrlPart):
                url = part.audio_url if isinstance(part.audio_url, str) else part.audio_url.url
                yield AudioPart((m, p), "audio_url", partial(chat_request.data_url_audio, url))


def unpack_within(parts: list[AudioPart], budget_s: float) -> list[bytes]:
    """Each part's bytes, unpacked in order while the lengths their headers declare add up to at most
    `budget_s`: the part that passes it is refused before anything is decoded. CPU work: a prep thread's."""
    unpacked, total = [], 0.0
    for part in parts:
        with _naming(part):
            data = part.unpack()
        total += declared_seconds(data) or 0.0
        if total > budget_s:
            raise AudioTooLong(
                f"The request's audio parts declare {total:.1f} s up to this one; the limit is {budget_s:g} s "
                "of audio in one request.",
                param=part.param,
            )
        unpacked.append(data)
    return unpacked


async def decode_within(
    parts: list[AudioPart], unpacked: list[bytes], prep: Prep, budget_s: float, record: RequestRecord | None
) -> dict[PartKey, np.ndarray]:
    """Each part decoded (in a prep thread) with what the earlier parts left of `budget_s` as its limit."""
    decoded: dict[PartKey, np.ndarray] = {}
    used = 0.0
    for part, data in zip(parts, unpacked, strict=True):
        with _naming(part):
            try:
                audio = await prep.audio(data, None, max(0.0, budget_s - used), record)
            except AudioTooLong:
                raise AudioTooLong(_over(budget_s), param=part.param) from None
        used += audio.shape[0] / SAMPLE_RATE
        if used > budget_s:
            raise AudioTooLong(_over(budget_s), param=part.param)
        decoded[part.key] = audio
    return decoded


def _over(budget_s: float) -> str:
    return f"The request's audio passes the limit of {budget_s:g} s of audio in one request at this part."


@contextmanager
def _naming(part: AudioPart) -> Iterator[None]:
    """Points an error's `param` at the part it came from (unless it already names something narrower)."""
    try:
        yield
    except VoxtralError as exc:
        if exc.param in (None, "messages"):
            exc.param = part.param
        raise
