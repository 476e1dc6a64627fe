"""Turn uploaded audio bytes into the one format the model takes: float32 mono samples at 16 kHz.

Limits are enforced *while* decoding, not after. Compressed audio can expand enormously: a 25 MB
Opus file of silence decodes to gigabytes of PCM, and a header forged to claim an absurd sample
rate or length can make a naive decoder or resampler allocate tens of gigabytes. So:

* the sample rate and channel count are checked before any sample is decoded (and again on every
  block, because a stream may change them midway);
* the duration the header declares is checked before decoding (exact: longer than
  ``max_seconds`` is rejected);
* headers lie, so decoded seconds are also counted block by block, and decoding stops with
  :class:`AudioTooLong` as soon as they exceed ``max_seconds + DECODE_MARGIN_S``. The small margin
  absorbs codec padding (encoder delay / final-frame padding) in files that carry no length;
* every block is down-mixed and resampled to 16 kHz as it arrives, so memory is bounded by the
  limit (about ``(max_seconds + margin) * 16000 * 4`` bytes, plus one block), never by what the
  file claims.

libsndfile (via soundfile) is tried first: WAV, FLAC, Ogg/Vorbis, Ogg/Opus, MP3 and friends.
Anything it cannot read goes to FFmpeg (via PyAV): M4A/MP4/AAC, WebM/Opus, MPEG, ... . The
filename extension only decides which of the two goes first; it is never trusted. Nothing touches
the disk. Every failure surfaces as :class:`AudioDecodeError` or :class:`AudioTooLong`, with a
message fit to show the user who sent the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import PurePath
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from app.errors import AudioDecodeError, AudioTooLong, VoxtralError

if TYPE_CHECKING:  # imported where FFmpeg is needed: most uploads are WAV/FLAC/MP3/OGG, read by libsndfile
    import av
    import av.container

SAMPLE_RATE = 16000
"""The rate every decoded array is resampled to (Voxtral's audio encoder expects 16 kHz)."""

DECODE_MARGIN_S = 0.5
"""Seconds of decoded audio tolerated past ``max_seconds`` when the file did not declare its length."""

_BLOCK_FRAMES = 32768
"""Frames per soundfile read: at most 32768 * 16 channels * 4 bytes = 2 MiB per block."""

_SF_UNKNOWN_FRAMES = 2**62
"""libsndfile reports SF_COUNT_MAX frames when it does not know the length."""

_PYAV_FIRST_EXTENSIONS = frozenset(
    {".m4a", ".mp4", ".m4b", ".aac", ".webm", ".mkv", ".mka", ".mov", ".3gp", ".wma", ".mpeg", ".mpg"}
)

_FFMPEG_DEMUXERS = ",".join(  # audio-bearing containers only: no playlists, concat, images or subtitles
    [
        "aac,ac3,eac3,aiff,amr,amrnb,amrwb,ape,asf,au,avi,caf,dts,dtshd,flac,flv,gsm,latm,loas,matroska,webm",
        "mov,mp4,m4a,3gp,3g2,mj2,mp3,mpc,mpc8,mpeg,mpegts,nistsphere,ogg,oga,rm,shn,sox,tak,tta,voc,w64",
        "wav,wv,xwma",
    ]
)

Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class AudioLimits:
    """What an upload may contain. Anything outside these bounds is rejected before it costs memory."""

    max_seconds: float  # longest accepted audio; longer -> AudioTooLong
    max_channels: int = 16  # more -> AudioDecodeError
    max_sample_rate: int = 384_000  # more (or <= 0) -> AudioDecodeError
    min_sample_rate: int = 1000


class _Unreadable(Exception):
    """One backend could not read the file; the other one may still manage."""

    def __init__(self, reason: str, *, opened: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.opened = opened


def decode_audio(data: bytes, limits: AudioLimits, filename: str | None = None) -> Float32Array:
    """float32, 1-D, mono, 16 kHz. Raises AudioDecodeError / AudioTooLong."""
    if not data:
        raise AudioDecodeError("Could not decode the audio file: the file is empty.")
    failures: list[_Unreadable] = []
    for decoder in _decoders_for(filename):
        try:
            return decoder(data, limits)
        except VoxtralError:
            raise
        except _Unreadable as exc:
            failures.append(exc)
        except Exception as exc:  # the boundary: whatever a backend throws, the caller sees AudioDecodeError
            failures.append(_Unreadable(f"the decoder failed ({_short(exc)})", opened=True))
    opened = [failure.reason for failure in failures if failure.opened]
    reason = opened[0] if opened else "it is not in a recognised audio format, or it is damaged"
    raise AudioDecodeError(f"Could not decode the audio file: {reason}.")


def declared_seconds(data: bytes, filename: str | None = None) -> float | None:
    """The length the file's header declares, in seconds, read without decoding a sample.

    None when neither backend can open the file or its header declares no length: the caller then
    bounds the audio while decoding it (``decode_audio`` stops at ``max_seconds``). Lets a request
    holding several files refuse their total before any of them is decoded.
    """
    for probe in _probes_for(filename):
        try:
            seconds = probe(data)
        except Exception:  # unreadable by this backend: the other may read it, or decoding will say why
            continue
        if seconds is not None and seconds > 0:  # never a negative or NaN length that would offset others
            return seconds
    return None


def encode_wav_float32(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Lossless in-memory WAV (FLOAT subtype) of a mono float32 array.

    Used to hand decoded audio to mistral-common, which wants a file; FLOAT keeps every sample bit-exact.
    """
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected a 1-D mono array, got shape {samples.shape}")
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


Decoder = Callable[[bytes, AudioLimits], Float32Array]


def _decoders_for(filename: str | None) -> tuple[Decoder, Decoder]:
    """Both backends, in the order the extension suggests. The extension is a hint, nothing more."""
    suffix = PurePath(filename).suffix.lower() if filename else ""
    if suffix in _PYAV_FIRST_EXTENSIONS:
        return (_decode_with_pyav, _decode_with_soundfile)
    return (_decode_with_soundfile, _decode_with_pyav)


def _probes_for(filename: str | None) -> tuple[Callable[[bytes], float | None], ...]:
    """The header readers, in the order `_decoders_for` tries the decoders."""
    if _decoders_for(filename)[0] is _decode_with_pyav:
        return (_pyav_header_seconds, _soundfile_header_seconds)
    return (_soundfile_header_seconds, _pyav_header_seconds)


def _check_format(sample_rate: int, channels: int, limits: AudioLimits) -> None:
    """Reject channel counts and sample rates that are corrupt or would blow up memory when resampled."""
    if channels <= 0:
        raise AudioDecodeError("Could not decode the audio file: it declares no audio channels.")
    if channels > limits.max_channels:
        raise AudioDecodeError(
            f"Could not decode the audio file: it has {channels} channels; at most {limits.max_channels} are supported."
        )
    if not limits.min_sample_rate <= sample_rate <= limits.max_sample_rate:
        raise AudioDecodeError(
            f"Could not decode the audio file: its sample rate of {sample_rate} Hz is outside the supported "
            f"range of {limits.min_sample_rate} to {limits.max_sample_rate} Hz."
        )


def _check_declared_seconds(seconds: float | None, limits: AudioLimits) -> None:
    """Fail fast when the header already says the audio is too long (exact: no margin)."""
    if seconds is not None and seconds > limits.max_seconds:
        raise AudioTooLong(f"Audio is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s.")


class _MonoCollector:
    """Down-mixes and resamples blocks as they arrive, and stops once decoded audio passes the limit."""

    def __init__(self, limits: AudioLimits) -> None:
        self._limits = limits
        self._chunks: list[Float32Array] = []
        self._seconds = 0.0
        self._rate = 0
        self._resampler: soxr.ResampleStream | None = None

    def add(self, block: Float32Array, sample_rate: int) -> None:
        """Take one (frames, channels) float32 block decoded at `sample_rate`."""
        _check_format(sample_rate, block.shape[1], self._limits)
        self._seconds += block.shape[0] / sample_rate
        ceiling = self._limits.max_seconds + DECODE_MARGIN_S
        if self._seconds > ceiling:
            raise AudioTooLong(
                f"Audio is longer than the limit of {self._limits.max_seconds:g} s "
                f"(decoding stopped after {ceiling:g} s)."
            )
        if not np.isfinite(block).all():
            raise AudioDecodeError("Could not decode the audio file: it contains NaN or infinite samples.")
        mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
        if sample_rate != self._rate:
            self._flush()
            self._start(sample_rate)
        self._push(mono)

    def finish(self) -> Float32Array:
        """All audio so far as one C-contiguous float32 array at SAMPLE_RATE."""
        self._flush()
        if not self._chunks or sum(len(chunk) for chunk in self._chunks) == 0:
            raise AudioDecodeError("Could not decode the audio file: it contains no audio samples.")
        audio = np.concatenate(self._chunks).astype(np.float32, copy=False)
        self._chunks = []
        return np.ascontiguousarray(audio)

    def _start(self, sample_rate: int) -> None:
        self._rate = sample_rate
        if sample_rate != SAMPLE_RATE:
            self._resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32")

    def _push(self, mono: Float32Array) -> None:
        if self._resampler is None:
            self._chunks.append(np.array(mono, dtype=np.float32))  # copy: never keep a view of a big block
        else:
            self._chunks.append(self._resampler.resample_chunk(np.ascontiguousarray(mono)))

    def _flush(self) -> None:
        if self._resampler is not None:
            self._chunks.append(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            self._resampler = None


# --- libsndfile -------------------------------------------------------------------------------------


def _decode_with_soundfile(data: bytes, limits: AudioLimits) -> Float32Array:
    try:
        sound_file = sf.SoundFile(io.BytesIO(data))
    except Exception as exc:
        raise _Unreadable(f"libsndfile could not open it ({exc})", opened=False) from exc
    with sound_file:
        _check_format(sound_file.samplerate, sound_file.channels, limits)
        frames = sound_file.frames
        if 0 < frames < _SF_UNKNOWN_FRAMES:
            _check_declared_seconds(frames / sound_file.samplerate, limits)
        collector = _MonoCollector(limits)
        try:
            for block in _soundfile_blocks(sound_file):
                collector.add(block, sound_file.samplerate)
        except VoxtralError:
            raise
        except Exception as exc:
            raise _Unreadable(f"the audio data is damaged ({exc})", opened=True) from exc
        return collector.finish()


def _soundfile_header_seconds(data: bytes) -> float | None:
    with sf.SoundFile(io.BytesIO(data)) as sound_file:
        frames, rate = sound_file.frames, sound_file.samplerate
    return frames / rate if 0 < frames < _SF_UNKNOWN_FRAMES and rate > 0 else None


def _soundfile_blocks(sound_file: sf.SoundFile) -> Iterator[Float32Array]:
    """Fixed-size (frames, channels) blocks until the decoder has nothing more to give."""
    while True:
        block = sound_file.read(frames=_BLOCK_FRAMES, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            return
        yield block


# --- FFmpeg (PyAV) ----------------------------------------------------------------------------------


def _decode_with_pyav(data: bytes, limits: AudioLimits) -> Float32Array:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", options={"format_whitelist": _FFMPEG_DEMUXERS})
    except Exception as exc:
        raise _Unreadable(f"FFmpeg could not open it ({_short(exc)})", opened=False) from exc
    with container:
        stream = _first_audio_stream(container, limits)
        _check_declared_seconds(_pyav_declared_seconds(container, stream), limits)
        collector = _MonoCollector(limits)
        try:
            for frame in container.decode(stream):
                collector.add(_frame_to_float(frame, limits), frame.sample_rate)
        except VoxtralError:
            raise
        except Exception as exc:
            raise _Unreadable(f"the audio data is damaged ({_short(exc)})", opened=True) from exc
        return collector.finish()


def _pyav_header_seconds(data: bytes) -> float | None:
    import av

    with av.open(io.BytesIO(data), mode="r", options={"format_whitelist": _FFMPEG_DEMUXERS}) as container:
        if not container.streams.audio:
            return None
        return _pyav_declared_seconds(container, container.streams.audio[0])


def _first_audio_stream(container: av.container.InputContainer, limits: AudioLimits) -> av.AudioStream:
    """The first audio stream, with its declared format checked before anything is decoded."""
    if not container.streams.audio:
        raise AudioDecodeError("Could not decode the audio file: it contains no audio stream.")
    stream = container.streams.audio[0]
    codec = stream.codec_context
    channels = codec.layout.nb_channels if codec.layout is not None else 0
    if codec.sample_rate and channels:  # some demuxers learn these only from the first frame
        _check_format(codec.sample_rate, channels, limits)
    return stream


def _pyav_declared_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    """The duration the stream or container header declares, if any."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * Fraction(stream.time_base))
    if container.duration is not None:
        from av import time_base

        return float(container.duration) / time_base
    return None


def _frame_to_float(frame: av.AudioFrame, limits: AudioLimits) -> Float32Array:
    """A decoded frame as a (samples, channels) float32 block in [-1, 1] (ints scaled, floats as decoded)."""
    channels = frame.layout.nb_channels
    _check_format(frame.sample_rate, channels, limits)
    raw = frame.to_ndarray()
    block = raw.T if frame.format.is_planar else raw.reshape(-1, channels)
    if block.dtype.kind == "f":
        converted: Float32Array = block.astype(np.float32, copy=False)
        return converted
    full_scale = float(2 ** (8 * block.dtype.itemsize - 1))
    offset = full_scale if block.dtype.kind == "u" else 0.0  # u8 is offset binary
    scaled: Float32Array = ((block.astype(np.float64) - offset) / full_scale).astype(np.float32)
    return scaled


def _short(exc: BaseException) -> str:
    """FFmpeg's error text without the errno prefix and the '<none>' file name PyAV appends."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(": '<none>'")[0].strip() or type(exc).__name__


# -- identity ------------------------------------------------------------------------------------------
_KEYS: dict[int, tuple[weakref.ref[np.ndarray], bytes]] = {}
"""`samples_key` of each array still alive, by its id: hashed once (in a request thread), read by the model's."""


def samples_key(audio: np.ndarray) -> bytes:
    """The identity of decoded samples: a 128-bit BLAKE2 of their float32 bytes and count (the audio encoder
    cache's key). Remembered for the array's life, so the prompt builder hashes it off the model's thread and
    the model finds it there: an array must not change once hashed (the prompt builder makes its arrays
    read-only)."""
    known = _KEYS.get(id(audio))
    if known is not None and known[0]() is audio:
        return known[1]
    samples = np.ascontiguousarray(audio, dtype=np.float32)
    digest = hashlib.blake2b(samples.data.cast("B"), digest_size=16)
    digest.update(len(samples).to_bytes(8, "little"))
    key = digest.digest()
    ident = id(audio)
    with contextlib.suppress(TypeError):  # an array that cannot be referenced weakly is hashed again next time
        _KEYS[ident] = (weakref.ref(audio, lambda _: _KEYS.pop(ident, None)), key)
    return key
