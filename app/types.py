"""Plain data passed between the layers: a validated, tokenized request and what comes back.

Nothing after the API edge re-validates: once a `PreparedRequest` exists its numbers are sane.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np

FinishReason = Literal["stop", "length", "tool_calls", "error", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-row decoding parameters; rows of one batch keep their own."""

    temperature: float = 0.0
    """0: greedy (exact argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1, as vLLM spells it): off."""
    min_p: float = 0.0
    """Keep tokens at least this fraction as likely as the most likely one; 0: off."""
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    """None: no log-probs; otherwise each token's log-prob and this many (0..20) most likely alternatives."""
    choices: int = 1
    """`n`: rows decoded from one prefill of the prompt, each with seed + its index."""


class Constraint(Protocol):
    """Per-row constrained decoding (tool calls, JSON schema): which tokens may come next."""

    @property
    def matcher(self) -> Any:
        """The llguidance matcher whose mask applies to the next token, or None when anything goes. The
        sampler fills the masks of a batch's matchers together, in parallel."""

    @property
    def vocab_size(self) -> int:
        """Tokens the matcher's tokenizer knows: the width of its mask."""

    def settle(self, token: int, remaining: int) -> int:
        """The token to take instead of the sampled `token`, with `remaining` tokens left (EOS included): the
        same token, or one that steers the output to its end in time (app/model/text/closing.py)."""

    def advance(self, token: int) -> None:
        """Record the token that was taken."""


@dataclass
class PreparedRequest:
    """A request ready for the model: token ids, its audio, and how to decode."""

    input_ids: list[int]
    audios: list[np.ndarray]
    """16 kHz mono float32, in prompt order, each padded to whole 30 s windows. The worker turns
    them into mel features on the model's device (app/model/compute/features.py)."""
    sampling: SamplingParams
    kind: Literal["transcription", "translation", "chat"]
    constraint_factory: Callable[[], Constraint] | None = None
    """Made fresh for each row in the worker thread: constraints are stateful."""
    cache_salt: str | None = None
    """Only prompts with the same salt share cached prefixes (vLLM's `cache_salt`); None: the unsalted pool."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's own distribution (log-softmax of the raw logits: before
    penalties, grammar masks, temperature and truncation), and the most likely alternatives'."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-prob) of the most likely tokens, most likely first."""


@dataclass(frozen=True)
class Sampled:
    """One row's token of one step; its log-probs when the row asked for them."""

    token: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class ParsedCall:
    """A tool call read from the model's tokens (app/model/text/toolcalls.py)."""

    name: str
    arguments: str
    """A JSON object, as a string (OpenAI's `function.arguments`)."""
    id: str


@dataclass
class CallDelta:
    """One `delta.tool_calls` entry of a streamed answer: the first of a call has its id and name."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class TokenEvent:
    """New tokens for one request, pushed by the worker as it decodes."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    """One per token id, when the request asked for log-probs."""
    index: int = 0
    """Which of the request's `n` choices these tokens belong to."""
    cached_tokens: int = 0
    """Prompt tokens the choice's row took from the prefix cache at its prefill (the same on each of its
    events; choice 0's is the request's: the other choices copy its prefill)."""


@dataclass
class GenerationResult:
    """The final word on one request."""

    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int = 0
    """Of `prompt_tokens`, those taken from the prefix cache instead of prefilled (OpenAI's `cached_tokens`)."""
    queue_time_s: float = 0.0
    run_time_s: float = 0.0
    time_to_first_token_s: float | None = None
    logprobs: list[TokenLogprob] | None = None
    """One per token id, when the request asked for log-probs."""
    choices: list[GenerationResult] | None = None
    """With n > 1: every choice's result, in index order (this one's token fields are choice 0's)."""
