"""Smart Turn v3 (`app.turn_end`), semantic_vad's turn-end model, on recorded speech: its features are
Whisper's, and it hears a sentence cut mid-phrase as less finished than the same sentence at its full stop."""

from __future__ import annotations

import numpy as np
import soundfile as sf
from transformers import WhisperFeatureExtractor

from app import turn_end
from tests.support.server import AUDIO

PAUSE = np.zeros(3200, np.float32)
"""The 200 ms of silence semantic_vad waits before it asks."""


def clip(name: str) -> np.ndarray:
    return np.asarray(sf.read(AUDIO / name, dtype="float32")[0])


def test_features_are_whisper_feature_extractors() -> None:
    """The preprocessing pipecat feeds the model: WhisperFeatureExtractor(chunk_length=8), normalised."""
    reference = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=8, n_fft=400, hop_length=160)
    jfk = clip("jfk.wav")
    for audio in (jfk[:16000], jfk):  # padded in front; the last 8 s kept
        window = turn_end.last_window(audio)
        assert window.shape == (turn_end.SAMPLES,) and window[-1] == audio[-1]
        expected = reference(
            window, sampling_rate=16000, max_length=turn_end.SAMPLES, padding="max_length", do_normalize=True
        )["input_features"][0]
        np.testing.assert_allclose(turn_end.features(audio), expected, atol=1e-4)


def test_a_sentence_at_its_full_stop_is_complete_cut_mid_phrase_is_not() -> None:
    """Real speech: Kennedy's "... ask not | what your country can do for you, ask what you can | do for your
    country." cut after "ask not" (3.5 s), after "what you can" (8.5 s), and at its full stop."""
    jfk = clip("jfk.wav")
    cut_a, cut_b, full = turn_end.probabilities(
        [np.concatenate([jfk[: int(s * 16000)], PAUSE]) for s in (3.5, 8.5, 10.6)]
    )
    assert full > 0.5 > max(cut_a, cut_b), (cut_a, cut_b, full)


def test_synthesized_sentences_cut_mid_phrase_are_less_complete() -> None:
    """espeak-ng sentences (tests/data/README.md): each cut after a word that needs another (its sample in
    turn_cuts.tsv), against the whole sentence. Espeak's voice is less natural than speech, so the model is
    surer of some than others: every pair in the right direction, and apart on average."""
    rows = [line.split("\t") for line in (AUDIO / "turn_cuts.tsv").read_text().splitlines()]
    sentences = [clip(name) for name, _, _ in rows]
    full = turn_end.probabilities([np.concatenate([s, PAUSE]) for s in sentences])
    cut = turn_end.probabilities(
        [np.concatenate([s[: int(at)], PAUSE]) for s, (_, at, _) in zip(sentences, rows, strict=True)]
    )
    assert all(f > c for f, c in zip(full, cut, strict=True)), list(zip(full, cut, strict=True))
    assert np.mean(full) - np.mean(cut) > 0.2 and np.mean(full) > 0.8, (full, cut)


def test_a_batch_answers_each_clip_as_alone() -> None:
    jfk = clip("jfk.wav")
    clips = [jfk[:56000], jfk[:170000], jfk[:8000]]
    batch = turn_end.probabilities(clips)
    np.testing.assert_allclose(batch, [turn_end.probabilities([c])[0] for c in clips], atol=1e-4)
    assert turn_end.probabilities([]) == []
