"""Unit tests for app.audio: real speech in every container, bad input rejected, limits enforced."""

from __future__ import annotations

import io
import resource
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app import audio
from app.audio import DECODE_MARGIN_S, SAMPLE_RATE, AudioLimits, declared_seconds, decode_audio, encode_wav_float32
from app.errors import AudioDecodeError, AudioTooLong
from tests.support.audio_fixtures import CLIP_NAMES, clip_bytes, jfk_samples, silent_opus, video_only

LIMITS = AudioLimits(max_seconds=60)
JFK_SECONDS = 11.0


# --- helpers ----------------------------------------------------------------------------------------


def fixture_bytes(name: str) -> bytes:
    return clip_bytes(name)


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def silence(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 2000) -> float:
    """Normalised cross-correlation of two signals at the best lag within +-max_lag samples (FFT-based)."""
    n = len(a) + len(b)
    corr = np.fft.irfft(np.fft.rfft(a, n) * np.conj(np.fft.rfft(b, n)), n)
    lags = np.concatenate([corr[: max_lag + 1], corr[-max_lag:]])
    return float(lags.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


def forge_wav_fmt(data: bytes, *, rate: int | None = None, channels: int | None = None) -> bytes:
    """Overwrite the sample rate and/or channel count in a WAV's fmt chunk."""
    forged = bytearray(data)
    fmt = forged.find(b"fmt ")
    if channels is not None:
        struct.pack_into("<H", forged, fmt + 10, channels)
    if rate is not None:
        struct.pack_into("<I", forged, fmt + 12, rate)
        struct.pack_into("<I", forged, fmt + 16, (rate * 2) & 0xFFFFFFFF)
    return bytes(forged)


def forge_flac_streaminfo(data: bytes, *, rate: int | None = None, total_samples: int | None = None) -> bytes:
    """Overwrite STREAMINFO's 20-bit sample rate and/or 36-bit total-sample count (0 means unknown)."""
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "first metadata block must be STREAMINFO"
    forged = bytearray(data)
    offset = 8 + 10  # block header, then min/max block size (2+2) and min/max frame size (3+3)
    packed = int.from_bytes(forged[offset : offset + 8], "big")  # rate:20 channels:3 bits:5 total:36
    if rate is not None:
        packed = (packed & ((1 << 44) - 1)) | (rate << 44)
    if total_samples is not None:
        packed = (packed & ~((1 << 36) - 1)) | total_samples
    forged[offset : offset + 8] = packed.to_bytes(8, "big")
    return bytes(forged)


def assert_model_ready(decoded: np.ndarray) -> None:
    assert decoded.dtype == np.float32
    assert decoded.ndim == 1
    assert decoded.flags.c_contiguous


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return jfk_samples()


@pytest.fixture
def headers_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend no header declared a duration, so only the while-decoding guard can stop a long file."""
    monkeypatch.setattr(audio, "_check_declared_seconds", lambda seconds, limits: None)


# --- real speech fixtures ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jfk.wav", "jfk.mp3", "jfk.flac", "jfk.ogg", "jfk.webm", "jfk.m4a"])
def test_jfk_decodes_from_every_container(name: str, jfk: np.ndarray) -> None:
    decoded = decode_audio(fixture_bytes(name), LIMITS, filename=name)
    assert_model_ready(decoded)
    assert abs(len(decoded) / SAMPLE_RATE - JFK_SECONDS) < 0.15
    assert best_correlation(decoded, jfk) > 0.9


def expected_seconds(name: str) -> float:
    """What soundfile says, where it can read the file; every jfk.* file is the same 11 s clip."""
    try:
        return float(sf.info(io.BytesIO(fixture_bytes(name))).duration)
    except sf.LibsndfileError:
        assert name.startswith("jfk"), f"add an expected duration for {name}"
        return JFK_SECONDS


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_every_fixture_decodes_with_its_duration(name: str) -> None:
    decoded = decode_audio(fixture_bytes(name), LIMITS, filename=name)
    assert_model_ready(decoded)
    assert abs(len(decoded) / SAMPLE_RATE - expected_seconds(name)) < 0.15


@pytest.mark.parametrize("name", ["jfk_44k_stereo.wav", "jfk_8k.wav"])
def test_resampling_and_downmix_preserve_the_signal(name: str, jfk: np.ndarray) -> None:
    decoded = decode_audio(fixture_bytes(name), LIMITS)
    assert abs(len(decoded) - len(jfk)) <= 2
    assert best_correlation(decoded, jfk) > 0.9


def test_correlation_check_tells_different_speech_apart(jfk: np.ndarray) -> None:
    other = decode_audio(fixture_bytes("speech_en.wav"), LIMITS)
    assert best_correlation(other, jfk) < 0.5


def test_16k_mono_wav_is_returned_sample_exact(jfk: np.ndarray) -> None:
    assert np.array_equal(decode_audio(fixture_bytes("jfk.wav"), LIMITS), jfk)


def test_silence_is_valid_audio() -> None:
    decoded = decode_audio(fixture_bytes("silence_5s.wav"), LIMITS)
    assert len(decoded) == 5 * SAMPLE_RATE
    assert not decoded.any()


@pytest.mark.parametrize(("name", "hint"), [("jfk.wav", "clip.m4a"), ("jfk.m4a", "clip.wav"), ("jfk.webm", None)])
def test_filename_extension_is_only_a_hint(name: str, hint: str | None) -> None:
    decoded = decode_audio(fixture_bytes(name), LIMITS, filename=hint)
    assert abs(len(decoded) / SAMPLE_RATE - JFK_SECONDS) < 0.15


@pytest.mark.parametrize("name", ["jfk.wav", "jfk_44k_stereo.wav", "jfk.flac"])
def test_both_backends_agree(name: str) -> None:
    data = fixture_bytes(name)
    via_sndfile = audio._decode_with_soundfile(data, LIMITS)
    via_ffmpeg = audio._decode_with_pyav(data, LIMITS)
    assert len(via_sndfile) == len(via_ffmpeg)
    np.testing.assert_allclose(via_sndfile, via_ffmpeg, atol=1e-4)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_ffmpeg_sample_formats_are_scaled_like_libsndfile(subtype: str) -> None:
    tone = (0.5 * np.sin(np.linspace(0, 200 * np.pi, 8000))).astype(np.float32)
    data = wav_bytes(tone, SAMPLE_RATE, subtype)
    np.testing.assert_allclose(
        audio._decode_with_pyav(data, LIMITS), audio._decode_with_soundfile(data, LIMITS), atol=1e-6
    )


def test_eight_channel_48k_wav_becomes_mono_16k() -> None:
    rng = np.random.default_rng(0)
    channels = rng.uniform(-0.5, 0.5, size=(48000 * 2, 8)).astype(np.float32)
    decoded = decode_audio(wav_bytes(channels, 48000, "FLOAT"), LIMITS)
    assert_model_ready(decoded)
    assert abs(len(decoded) - 2 * SAMPLE_RATE) <= 2
    expected = decode_audio(wav_bytes(channels.mean(axis=1), 48000, "FLOAT"), LIMITS)
    np.testing.assert_allclose(decoded, expected, atol=1e-5)


def test_decoded_values_are_not_normalised() -> None:
    quiet = np.full(1600, 0.01, dtype=np.float32)
    assert np.array_equal(decode_audio(wav_bytes(quiet, SAMPLE_RATE, "FLOAT"), LIMITS), quiet)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", [None, "upload.wav", "upload.m4a"])
@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_are_rejected(seed: int, filename: str | None) -> None:
    with pytest.raises(AudioDecodeError, match="Could not decode the audio file"):
        decode_audio(np.random.default_rng(seed).bytes(4096), LIMITS, filename=filename)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"RIFF", id="four-bytes"),
        pytest.param(b"hello, this is plainly not audio\n" * 100, id="text"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(1000), id="png-header"),
    ],
)
def test_non_audio_is_rejected(data: bytes) -> None:
    with pytest.raises(AudioDecodeError):
        decode_audio(data, LIMITS, filename="speech.wav")


def test_header_only_wav_is_rejected(jfk: np.ndarray) -> None:
    header_only = wav_bytes(jfk, SAMPLE_RATE)[:44]
    with pytest.raises(AudioDecodeError):
        decode_audio(header_only, LIMITS)


def test_wav_with_no_samples_is_rejected() -> None:
    with pytest.raises(AudioDecodeError):
        decode_audio(wav_bytes(np.zeros(0, np.float32), SAMPLE_RATE), LIMITS)


@pytest.mark.parametrize("cut", [45, 1000, 1001, 100_000])
def test_truncated_wav_decodes_what_is_there(cut: int) -> None:
    truncated = fixture_bytes("jfk.wav")[:cut]
    try:
        decoded = decode_audio(truncated, LIMITS)
    except AudioDecodeError:
        return
    assert_model_ready(decoded)
    assert len(decoded) <= (cut - 44) // 2


@pytest.mark.parametrize("name", ["jfk.mp3", "jfk.ogg", "jfk.webm", "jfk.m4a", "jfk.flac"])
@pytest.mark.parametrize("fraction", [0.01, 0.5])
def test_truncated_compressed_files_decode_or_raise_decode_error(name: str, fraction: float) -> None:
    data = fixture_bytes(name)
    try:
        decoded = decode_audio(data[: int(len(data) * fraction)], LIMITS, filename=name)
    except AudioDecodeError:
        return
    assert_model_ready(decoded)
    assert len(decoded) / SAMPLE_RATE < JFK_SECONDS


def test_wav_claiming_more_data_than_present_decodes_what_is_there() -> None:
    forged = bytearray(fixture_bytes("jfk.wav"))
    struct.pack_into("<I", forged, 4, 0x7FFFFFF0)  # RIFF size
    struct.pack_into("<I", forged, forged.find(b"data") + 4, 0x7FFFFFF0)  # data size: ~18 hours at 16 kHz
    try:
        decoded = decode_audio(bytes(forged), LIMITS)
    except AudioDecodeError:
        return
    assert abs(len(decoded) / SAMPLE_RATE - JFK_SECONDS) < 0.01


@pytest.mark.parametrize("rate", [0, 1, 999, 384_001, 2**31, 2**32 - 1])
def test_wav_with_forged_sample_rate_is_rejected(rate: int) -> None:
    with pytest.raises(AudioDecodeError):
        decode_audio(forge_wav_fmt(fixture_bytes("jfk.wav"), rate=rate), LIMITS)


@pytest.mark.parametrize("channels", [0, 17, 65535])
def test_wav_with_forged_channel_count_is_rejected(channels: int) -> None:
    with pytest.raises(AudioDecodeError):
        decode_audio(forge_wav_fmt(fixture_bytes("jfk.wav"), channels=channels), LIMITS)


@pytest.mark.parametrize("rate", [1, 500, 384_001, 655_350, 2**20 - 1])
def test_flac_with_forged_sample_rate_is_rejected(rate: int) -> None:
    # STREAMINFO's rate field is 20 bits, so 1 048 575 Hz is the most a FLAC header can claim.
    with pytest.raises(AudioDecodeError, match="sample rate"):
        decode_audio(forge_flac_streaminfo(fixture_bytes("jfk.flac"), rate=rate), LIMITS)


def test_flac_with_zeroed_sample_rate_decodes_or_raises_decode_error() -> None:
    # 0 Hz in STREAMINFO makes libsndfile refuse; FFmpeg reads the true rate from the frame headers.
    forged = forge_flac_streaminfo(fixture_bytes("jfk.flac"), rate=0)
    try:
        decoded = decode_audio(forged, LIMITS)
    except AudioDecodeError:
        return
    assert abs(len(decoded) / SAMPLE_RATE - JFK_SECONDS) < 0.15


def test_channel_limit_is_enforced() -> None:
    stereo = np.zeros((1600, 2), dtype=np.float32)
    with pytest.raises(AudioDecodeError, match="2 channels"):
        decode_audio(wav_bytes(stereo, SAMPLE_RATE), AudioLimits(max_seconds=60, max_channels=1))


def test_non_finite_samples_are_rejected() -> None:
    samples = np.zeros(1600, dtype=np.float32)
    samples[100] = np.nan
    with pytest.raises(AudioDecodeError, match="NaN"):
        decode_audio(wav_bytes(samples, SAMPLE_RATE, "FLOAT"), LIMITS)


@pytest.mark.parametrize(("container_format", "codec"), [("mp4", "mpeg4"), ("matroska", "mpeg4")])
def test_container_without_audio_stream_is_rejected(container_format: str, codec: str) -> None:
    try:
        data = video_only(container_format, codec)
    except Exception as exc:  # an FFmpeg build without this muxer or encoder
        pytest.skip(f"PyAV cannot write a video-only {container_format}: {exc}")
    with pytest.raises(AudioDecodeError, match="no audio stream"):
        decode_audio(data, LIMITS, filename="clip.mp4")


def test_unexpected_backend_failure_becomes_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(data: bytes, limits: AudioLimits) -> np.ndarray:
        raise RuntimeError("boom")

    monkeypatch.setattr(audio, "_decode_with_soundfile", explode)
    monkeypatch.setattr(audio, "_decode_with_pyav", explode)
    with pytest.raises(AudioDecodeError, match="boom"):
        decode_audio(fixture_bytes("jfk.wav"), LIMITS)


def test_module_imports_no_web_framework_or_upper_layer() -> None:
    code = (
        "import sys, app.audio\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in {'fastapi', 'starlette', 'uvicorn'}\n"
        "       or m.startswith(('app.api', 'app.engine', 'app.model'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- duration limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_audio_one_second_over_the_limit_is_rejected_from_the_header(fmt: str) -> None:
    data = wav_bytes(silence(11), SAMPLE_RATE, "PCM_16", fmt)
    with pytest.raises(AudioTooLong, match=r"11\.0 s long; the limit is 10 s"):
        decode_audio(data, AudioLimits(max_seconds=10))


def test_audio_exactly_at_the_limit_is_accepted() -> None:
    decoded = decode_audio(wav_bytes(silence(10), SAMPLE_RATE), AudioLimits(max_seconds=10))
    assert len(decoded) == 10 * SAMPLE_RATE


@pytest.mark.usefixtures("headers_ignored")
@pytest.mark.parametrize("backend", ["_decode_with_soundfile", "_decode_with_pyav"])
def test_audio_one_second_over_the_limit_is_rejected_while_decoding(backend: str) -> None:
    decoder = getattr(audio, backend)
    limits = AudioLimits(max_seconds=10)
    with pytest.raises(AudioTooLong, match="longer than the limit of 10 s"):
        decoder(wav_bytes(silence(11, 44100), 44100), limits)
    within_margin = decoder(wav_bytes(silence(10 + DECODE_MARGIN_S / 2, 44100), 44100), limits)
    assert abs(len(within_margin) / SAMPLE_RATE - (10 + DECODE_MARGIN_S / 2)) < 0.01


def test_flac_with_unknown_length_is_stopped_while_decoding() -> None:
    # total_samples = 0 means "unknown" in FLAC: no length to check first; only the block counter can stop it.
    flac = forge_flac_streaminfo(wav_bytes(silence(600), SAMPLE_RATE, "PCM_16", "FLAC"), total_samples=0)
    assert len(flac) < 1_000_000
    assert decode_audio(flac, AudioLimits(max_seconds=600)).shape == (600 * SAMPLE_RATE,)
    with pytest.raises(AudioTooLong, match="longer than the limit of 60 s"):
        decode_audio(flac, LIMITS)


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_declared_seconds_reads_every_fixtures_length_from_its_header(name: str) -> None:
    declared = declared_seconds(fixture_bytes(name), name)
    assert declared is None or abs(declared - expected_seconds(name)) < 0.15, declared
    if name.endswith((".wav", ".flac", ".ogg", ".m4a", ".webm")):
        assert declared is not None


def test_declared_seconds_decodes_no_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio._MonoCollector, "add", lambda *args: pytest.fail("a sample was decoded"))
    assert declared_seconds(wav_bytes(silence(600), SAMPLE_RATE, "PCM_16", "FLAC")) == 600.0
    assert declared_seconds(silent_opus(1800, "webm"), "x.webm") == pytest.approx(1800, abs=1)


def test_declared_seconds_is_none_for_what_declares_nothing() -> None:
    unknown = forge_flac_streaminfo(wav_bytes(silence(5), SAMPLE_RATE, "PCM_16", "FLAC"), total_samples=0)
    assert declared_seconds(unknown) is None
    assert declared_seconds(b"not audio at all" * 100) is None
    assert declared_seconds(b"") is None


@pytest.fixture(scope="module")
def half_hour_of_opus_silence() -> dict[str, bytes]:
    return {fmt: silent_opus(1800, fmt) for fmt in ("ogg", "webm")}


@pytest.mark.parametrize("fmt", ["ogg", "webm"])
@pytest.mark.parametrize("trust_headers", [True, False], ids=["header-check", "decode-guard"])
def test_compressed_silence_bomb_is_stopped_with_bounded_memory(
    fmt: str,
    trust_headers: bool,
    half_hour_of_opus_silence: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """30 min of Opus silence is ~0.5 MB but 115 MB of 16 kHz float32 (345 MB at 48 kHz) if fully decoded."""
    bomb = half_hour_of_opus_silence[fmt]
    assert len(bomb) < 1_000_000
    if not trust_headers:
        monkeypatch.setattr(audio, "_check_declared_seconds", lambda seconds, limits: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with pytest.raises(AudioTooLong):
            decode_audio(bomb, LIMITS, filename=f"bomb.{fmt}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024


# --- encode_wav_float32 -----------------------------------------------------------------------------


def test_encode_wav_float32_round_trips_exactly(jfk: np.ndarray) -> None:
    samples = np.concatenate([jfk, np.array([1.5, -2.0, 1e-30, 0.0], dtype=np.float32)])
    decoded, rate = sf.read(io.BytesIO(encode_wav_float32(samples)), dtype="float32")
    assert rate == SAMPLE_RATE
    assert np.array_equal(decoded, samples)
    assert sf.info(io.BytesIO(encode_wav_float32(samples, 8000))).samplerate == 8000


def test_encode_wav_float32_output_decodes_back_unchanged(jfk: np.ndarray) -> None:
    assert np.array_equal(decode_audio(encode_wav_float32(jfk), LIMITS), jfk)


# --- properties -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, database=None)  # no .hypothesis/ left in the tree
@given(
    samples=hnp.arrays(
        np.float32,
        st.integers(min_value=200, max_value=6000),
        elements=st.floats(min_value=-1.0, max_value=1.0, width=32),
    ),
    rate=st.integers(min_value=8000, max_value=48000),
    subtype=st.sampled_from(["PCM_16", "FLOAT"]),
)
def test_any_wav_decodes_to_mono_16k_of_the_right_length(samples: np.ndarray, rate: int, subtype: str) -> None:
    decoded = decode_audio(wav_bytes(samples, rate, subtype), LIMITS, filename="random.wav")
    assert_model_ready(decoded)
    expected = len(samples) * SAMPLE_RATE / rate
    assert abs(len(decoded) - expected) <= 2 + 2 * expected / 1000
