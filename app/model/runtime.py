"""The loaded model behind one object: everything the server uses of a checkpoint.

The serving layer and the engine see this facade, never the tokenizer's internals: the prompt builder,
the batch generator, the vocabulary (token bytes, special ids) and the ONE detokenizer. Built once per
app from a `LoadedModel` (tests share one load across many apps, each with its own generator).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from app.model.compute.features import LogMel
from app.model.compute.generate import WEIGHT_MAJOR, BatchGenerator
from app.model.compute.loader import LoadedModel
from app.model.fingerprint import with_variant
from app.model.text.constrained import Constrainer
from app.model.text.prompts import Prompter
from app.model.text.vocabulary import TokenVocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRuntime:
    prompter: Prompter
    generator: BatchGenerator
    vocab: TokenVocab
    pad_id: int
    fingerprint: str
    """`system_fingerprint` of every chat answer: the loaded model's, and the projection chosen on this CPU."""

    @classmethod
    def of(cls, loaded: LoadedModel, model_id: str) -> ModelRuntime:
        """A pass over the vocabulary (~0.1 s for 131k tokens): run it off the event loop."""
        prompter = Prompter(loaded.processor, model_id)
        tekken = prompter.tekken
        log_mel = LogMel(
            loaded.processor.feature_extractor,
            frames_per_chunk=loaded.model.config.audio_config.max_source_positions * 2,
            device=loaded.device,
        )
        pad_id = int(tekken.pad_id)
        generator = BatchGenerator(loaded.model, pad_token_id=pad_id, log_mel=log_mel)
        fingerprint = loaded.fingerprint
        if generator.weight_major:
            log.info("a few rows project weight-major: measured faster than lm_head on this CPU")
            fingerprint = with_variant(fingerprint, WEIGHT_MAJOR)
        return cls(prompter, generator, TokenVocab.from_tekken(tekken), pad_id, fingerprint)

    @property
    def eos_id(self) -> int:
        return self.vocab.eos_id

    def text_bytes(self, token_ids: Sequence[int]) -> bytes:
        """UTF-8 of the text tokens, control tokens dropped: what every text the server returns is
        decoded from (incrementally when streamed, so a stream and a whole answer are the same text)."""
        return self.vocab.bytes_of(token_ids)

    def text(self, token_ids: Sequence[int]) -> str:
        """The one detokenizer: text without control tokens (answers, stop strings, --log-prompts)."""
        return self.vocab.text(token_ids)

    @cached_property
    def constrainer(self) -> Constrainer:
        """Compiles tool-call and response_format grammars; its tokenizer is built on first use."""
        return Constrainer(self.vocab)
