"""A long greedy decode through the slot cache and the lean step gives the reference stack's tokens
(`model.generate`) across the widths the step reads."""

from __future__ import annotations

import torch

from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator, Row, sample
from app.model.compute.loader import LoadedModel
from app.model.text.prompts import Prompter
from app.types import SamplingParams
from tests.support.audio_fixtures import JFK


def test_long_greedy_decode_equals_model_generate(loaded: LoadedModel) -> None:
    """200 tokens after a ~390-token prompt cross from a 512-position step to a 768 one: every token id matches
    the reference stack."""
    prompter = Prompter(loaded.processor, "tiny")
    encoded = prompter.transcription(JFK, "en")
    log_mel = LogMel(loaded.processor.feature_extractor, 3000)
    gen = BatchGenerator(loaded.model, pad_token_id=11, log_mel=log_mel)
    row = Row(encoded.input_ids, encoded.audios, SamplingParams())
    state, logits = gen.prefill([row])
    for _ in range(200):
        token = sample(logits, state.rows)
        row.generated += token
        logits = gen.step(state, torch.tensor(token))
    with torch.inference_mode():
        reference = loaded.model.generate(
            input_ids=torch.tensor([encoded.input_ids]),
            input_features=log_mel.batch(encoded.audios),
            attention_mask=torch.ones(1, len(encoded.input_ids), dtype=torch.long),
            max_new_tokens=200,
            do_sample=False,
        )[0, len(encoded.input_ids) :].tolist()
    assert len(encoded.input_ids) + len(reference) > 512, "the reference stopped early: no width is crossed"
    assert row.generated[: len(reference)] == reference
