"""The audio encoder cache: a repeated recording is encoded once, and answers are the same with it.

Unit checks of the LRU bound and the key, then the real tiny model: a second prefill of the same audio takes its
embeddings from the cache (counted) and gives bit-equal logits (the same tensor feeds the same decoder ops); an
audio that differs in ONE sample is a miss with other logits; `n` choices and other prompts around the same
audio reuse it."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.audio import encode_wav_float32, samples_key
from app.model.compute.encoder_cache import EncoderCache
from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator
from app.model.compute.loader import LoadedModel
from app.model.compute.row import Row
from app.model.text.prompts import Prompter
from app.types import SamplingParams
from tests.support.audio_fixtures import JFK


def test_the_cache_drops_the_least_recently_used_within_its_bytes() -> None:
    cache = EncoderCache(max_bytes=3 * 400)
    for key in (b"a", b"b", b"c"):
        cache.put(key, torch.zeros(100))  # 400 bytes each
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", torch.zeros(100))
    assert cache.get(b"b") is None and cache.get(b"c") is not None and cache.get(b"d") is not None
    cache.put(b"huge", torch.zeros(1000))  # larger than the whole cache: not kept, nothing dropped
    assert cache.get(b"huge") is None
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.queries, stats.hits) == (3, 1200, 5, 3)


def test_the_key_is_the_samples_not_the_array() -> None:
    audio = np.resize(JFK, 16000).astype(np.float32)
    same = audio.copy()
    other = audio.copy()
    other[1234] += 1e-6
    assert samples_key(audio) == samples_key(same) != samples_key(other)
    assert samples_key(audio[:-1]) != samples_key(audio)
    assert samples_key(audio) == samples_key(audio)  # remembered for the array's life


def _prefill(gen: BatchGenerator, prompter: Prompter, audio: np.ndarray, text: str) -> torch.Tensor:
    chat = [{"role": "user", "content": [{"type": "input_audio", "audio": audio}, {"type": "text", "text": text}]}]
    encoded = prompter.chat(chat)
    return gen.prefill([Row(encoded.input_ids, encoded.audios, SamplingParams())])[1]


def test_a_repeated_audio_is_encoded_once_with_the_same_logits(loaded: LoadedModel) -> None:
    log_mel = LogMel(loaded.processor.feature_extractor, 3000)
    gen = BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel)
    prompter = Prompter(loaded.processor, "tiny")
    audio = np.resize(JFK, 16000 * 40).astype(np.float32)  # two windows
    first = _prefill(gen, prompter, audio, "What is said?")
    assert gen.encoder_cache.stats().hits == 0 and gen.encoder_cache.stats().entries == 1
    again = _prefill(gen, prompter, audio.copy(), "What is said?")
    assert gen.encoder_cache.stats().hits == 1
    assert torch.equal(first, again)
    other_question = _prefill(gen, prompter, audio.copy(), "Who speaks?")
    assert gen.encoder_cache.stats().hits == 2 and not torch.equal(first, other_question)
    changed = audio.copy()
    changed[16000 * 35] += 0.01  # one sample, in the second window
    differs = _prefill(gen, prompter, changed, "What is said?")
    assert gen.encoder_cache.stats().hits == 2 and gen.encoder_cache.stats().entries == 2
    assert not torch.equal(first, differs)


def test_with_the_cache_off_the_logits_are_the_same(loaded: LoadedModel) -> None:
    log_mel = LogMel(loaded.processor.feature_extractor, 3000)
    prompter = Prompter(loaded.processor, "tiny")
    # Prefix caching off in both: the second prompt starts as the first (its audio), a prefix hit would differ.
    on = BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel, prefix_caching=False)
    off = BatchGenerator(loaded.model, 11, log_mel=log_mel, encoder_cache_bytes=0, prefix_caching=False)
    audio = np.resize(JFK, 16000 * 11).astype(np.float32)
    _prefill(on, prompter, audio, "Warm the cache.")
    hit = _prefill(on, prompter, audio, "What is said?")
    assert on.encoder_cache.stats().hits == 1
    assert torch.equal(hit, _prefill(off, prompter, audio, "What is said?"))
    assert off.encoder_cache.stats().entries == 0


def _counts(http: httpx.Client) -> dict[str, float]:
    families = text_string_to_metric_families(http.get("/metrics").text)
    return {s.name: s.value for f in families if f.name.startswith("voxtral_encoder_cache") for s in f.samples}


def test_the_server_reuses_a_repeated_file_and_counts_it(client: Any, http: httpx.Client) -> None:
    """The same file transcribed twice: one encoding, one reuse, counted (queries and hits as counters, bytes
    as a gauge), with the same text."""
    gain = float(np.random.default_rng().uniform(0.5, 0.9))  # a recording no other test sent
    clip = encode_wav_float32((JFK * gain).astype(np.float32))
    before = _counts(http)
    first = client.audio.transcriptions.create(model="tiny", file=("a.wav", clip), response_format="json")
    again = client.audio.transcriptions.create(model="tiny", file=("b.wav", clip), response_format="json")
    assert first.text == again.text
    after = _counts(http)
    assert after["voxtral_encoder_cache_queries_total"] - before["voxtral_encoder_cache_queries_total"] == 2
    assert after["voxtral_encoder_cache_hits_total"] - before["voxtral_encoder_cache_hits_total"] == 1
    assert after["voxtral_encoder_cache_bytes"] > 0
