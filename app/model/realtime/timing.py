"""The latency knob and the 80 ms frame arithmetic of Voxtral Realtime, as pure functions.

The model emits one token per audio token-frame (1,280 samples at 16 kHz: 8 mel frames, 80 ms), `delay`
frames behind the audio it has heard. Which samples each frame's log-mel window reads follows transformers'
streaming recipe (VoxtralRealtimeProcessor: `num_samples_first_audio_chunk`, `num_samples_per_audio_chunk`, a
window reaching `win_length // 2` samples past its frame), so a frame is ready exactly when that recipe could
compute it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

DelayName = Literal["minimal", "low", "medium", "high", "xhigh"]

DELAY_MS: dict[str, int] = {"minimal": 80, "low": 240, "medium": 480, "high": 960, "xhigh": 2400}
"""OpenAI's `audio.input.transcription.delay` values as the model's delays: `medium` is the model's
recommended 480 ms (6 tokens), `minimal` its shortest (one token) and `xhigh` its longest (2.4 s)."""
FRAME_MS = 80
MAX_DELAY_MS = 2400


def delay_tokens(delay: str | int | None, default_ms: int = 480) -> int:
    """Delay tokens for an OpenAI delay name or an explicit delay in milliseconds (a multiple of 80 from 80 to
    2,400); None gives `default_ms`. Raises ValueError on anything else, saying what is accepted."""
    if delay is None:
        delay = default_ms
    if isinstance(delay, str):
        if delay not in DELAY_MS:
            raise ValueError(f"delay {delay!r} is not one of {', '.join(DELAY_MS)} (or milliseconds)")
        delay = DELAY_MS[delay]
    if isinstance(delay, bool) or not FRAME_MS <= delay <= MAX_DELAY_MS or delay % FRAME_MS:
        raise ValueError(f"delay {delay!r} ms must be a multiple of {FRAME_MS} from {FRAME_MS} to {MAX_DELAY_MS}")
    return delay // FRAME_MS


@dataclass(frozen=True)
class FrameGeometry:
    """The sample arithmetic of one checkpoint (its tekken audio section and feature extractor)."""

    hop: int = 160
    """Samples a mel frame."""
    window: int = 400
    """Samples an STFT window reads (centred on its frame)."""
    mels_per_token: int = 8
    left_pad_tokens: int = 32
    """Silent token-frames the stream starts with (mistral-common's `streaming_n_left_pad_tokens`)."""
    right_pad_extra: int = 10
    """Token-frames of silence a flush adds beyond the delay and one more (mistral-common's
    OFFLINE_STREAMING_BUFFER_TOKENS): room for the last word to come out."""

    @classmethod
    def of(cls, processor: Any) -> FrameGeometry:
        """Read from a VoxtralRealtimeProcessor."""
        audio = processor.mistral_common_audio_config
        extractor = processor.feature_extractor
        delay = audio.get_num_delay_tokens()
        return cls(
            hop=extractor.hop_length,
            window=extractor.win_length,
            mels_per_token=audio.audio_length_per_tok,
            left_pad_tokens=audio.n_left_pad_tokens,
            right_pad_extra=audio.n_right_pad_tokens() - delay - 1,
        )

    @property
    def samples_per_token(self) -> int:
        return self.hop * self.mels_per_token

    def prompt_tokens(self, delay: int) -> int:
        """Positions of the first forward: BOS, the left pad and the delay (one token comes out of it)."""
        return 1 + self.left_pad_tokens + delay

    def first_samples(self, delay: int) -> int:
        """Samples (after the left pad) the first forward reads: frames 0..delay and half a window."""
        return ((delay + 1) * self.mels_per_token - 1) * self.hop + self.window // 2

    def window_start(self, delay: int, step: int) -> int:
        """First sample of step `step`'s (1-based: step 0 is the first forward) log-mel window."""
        return (delay + step) * self.samples_per_token - self.window // 2

    @property
    def step_samples(self) -> int:
        """Samples one step's log-mel window reads: its 8 frames plus a window, as transformers' recipe."""
        return self.samples_per_token + self.window

    def tokens_ready(self, samples: int, delay: int) -> int:
        """How many tokens `samples` received samples let the model emit: 0 before the first forward's
        window is whole, then one more per 1,280 samples."""
        if samples < self.first_samples(delay):
            return 0
        return 1 + max(0, (samples - self.window // 2) // self.samples_per_token - (delay + 1))

    def flush_samples(self, samples: int, delay: int) -> int:
        """Silent samples a flush appends after `samples`: up to a whole token-frame, then delay + 1 +
        `right_pad_extra` frames (mistral-common's streaming right pad), so every spoken frame is decoded."""
        per = self.samples_per_token
        return (per - samples % per) % per + (delay + 1 + self.right_pad_extra) * per
