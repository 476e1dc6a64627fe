"""The loaded model behind one object: everything the server uses of a checkpoint.

The only door from the serving layer into the model's two halves (`compute/`: what runs on the device;
`text/`: tokens <-> text, prompts, tool calls, grammars); serving names nothing else of `app.model` but the
plain values of `app.model.values`. It holds the prompt builder, the batch generator, the vocabulary and
the ONE detokenizer. Built once per app from a `LoadedModel` (tests share one load across many apps, each
with its own generator).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property, partial

from app.config import Settings
from app.model.compute.budget import plan_cache
from app.model.compute.features import LogMel
from app.model.compute.generate import BatchGenerator
from app.model.compute.loader import LoadedModel
from app.model.compute.parallel import LeaderGenerator
from app.model.text.callstream import CallReader, ChatOutput, chat_output
from app.model.text.constrained import Constrainer
from app.model.text.detok import IncrementalDecoder
from app.model.text.prompts import Prompter
from app.model.text.toolcalls import mistral_call_id, split_at_calls
from app.model.text.vocabulary import read_vocab
from app.model.values import TokenVocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRuntime:
    prompter: Prompter
    generator: BatchGenerator
    vocab: TokenVocab
    fingerprint: str
    """`system_fingerprint` of every chat answer: the loaded model's, and the projection chosen on this CPU."""

    @classmethod
    def of(cls, loaded: LoadedModel, settings: Settings) -> ModelRuntime:
        """The generator over a KV cache of the slots the settings' budget holds (allocated here: raises
        `ModelLoadError` when it holds none), and a pass over the whole vocabulary, growing with its size: run it
        off the event loop."""
        prompter = Prompter(loaded.processor, settings.model_id)
        tekken = prompter.tekken
        log_mel = log_mel_of(loaded)
        pad_id = int(tekken.pad_id)
        cache = plan_cache(loaded.model, settings)
        kind = BatchGenerator if loaded.followers is None else partial(LeaderGenerator, followers=loaded.followers)
        generator = kind(
            loaded.model,
            pad_token_id=pad_id,
            log_mel=log_mel,
            cache=cache,
            eager=settings.enforce_eager,
            encoder_cache_bytes=settings.encoder_cache_memory_bytes,
            prefix_caching=settings.enable_prefix_caching,
        )
        return cls(prompter, generator, read_vocab(tekken), loaded.fingerprint)

    @property
    def eos_id(self) -> int:
        return self.vocab.eos_id

    def text(self, token_ids: Sequence[int]) -> str:
        """The one detokenizer: text without control tokens (answers, stop strings, --log-prompts)."""
        return self.vocab.text(token_ids)

    @cached_property
    def constrainer(self) -> Constrainer:
        """Compiles tool-call and response_format grammars; its tokenizer is built on first use."""
        return Constrainer(self.vocab)

    def decoder(self, stops: Sequence[str] = ()) -> IncrementalDecoder:
        """An incremental detokenizer for one streamed answer, cut at the first of `stops`."""
        return IncrementalDecoder.from_bytes(self.vocab.bytes_of, stops)

    def split_at_calls(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(what comes before the first [TOOL_CALLS], the rest from that marker on)."""
        return split_at_calls(ids, self.vocab)

    def call_reader(self) -> CallReader:
        """Reads one streamed answer's tokens from its first [TOOL_CALLS] on as call deltas."""
        return CallReader(self.vocab)

    def chat_output(
        self, ids: Sequence[int], finish_reason: str, names: Collection[str] | None, stops: Sequence[str]
    ) -> ChatOutput:
        """A whole generation read as text and tool calls (`names`: the callable functions; None: tools off)."""
        return chat_output(ids, finish_reason, self.vocab, names, stops)

    @staticmethod
    def call_id(openai_id: str) -> str:
        """An OpenAI tool-call id in Mistral's 9-alphanumeric shape (deterministic; Mistral ids kept)."""
        return mistral_call_id(openai_id)


def log_mel_of(loaded: LoadedModel) -> LogMel:
    """The audio front end of `loaded`: log-mel windows as its encoder reads them, on its device."""
    return LogMel(
        loaded.processor.feature_extractor,
        frames_per_chunk=loaded.model.config.audio_config.max_source_positions * 2,
        device=loaded.device,
    )
