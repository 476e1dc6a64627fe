"""The in-place KV cache holds exactly what concatenation would, and decoding through it gives the
reference stack's tokens (`model.generate`) well past the points where its buffers regrow."""

from __future__ import annotations

import torch

from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator, Row, sample
from app.model.compute.kvcache import GrowingLayer
from app.model.compute.loader import LoadedModel
from app.model.text.prompts import Prompter
from app.types import SamplingParams
from tests.support.audio_fixtures import JFK


def test_appends_equal_concatenation_and_regrow_rarely() -> None:
    torch.manual_seed(0)
    layer = GrowingLayer()
    k_ref = v_ref = torch.empty(3, 2, 0, 16)
    buffers = set()
    for new in [37, 1, 5, *[1] * 600]:
        k, v = torch.randn(3, 2, new, 16), torch.randn(3, 2, new, 16)
        keys, values = layer.update(k, v)
        k_ref, v_ref = torch.cat([k_ref, k], dim=-2), torch.cat([v_ref, v], dim=-2)
        assert torch.equal(keys, k_ref) and torch.equal(values, v_ref)
        assert layer.get_seq_length() == k_ref.shape[-2]
        buffers.add(keys.untyped_storage().data_ptr())
    # 643 positions with 1/8 (at least 64) of room each time: a handful of buffers, not one per step.
    assert 2 <= len(buffers) <= 12


def test_long_greedy_decode_equals_model_generate(loaded: LoadedModel) -> None:
    """200 tokens cross several regrowths (the room starts at 64): every token id matches the
    reference stack, which grows transformers' own cache by concatenation."""
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
    assert len(reference) > 130, "the reference stopped early: the test would not reach a regrowth"
    assert row.generated[: len(reference)] == reference
