"""A transcription piece's log-probs as OpenAI returns them with `include[]=logprobs`: one entry per token
of the text, so control tokens and the model's `lang:xx` prefix (not part of the text) are left out.

Streamed, a delta event carries the entries of the tokens released with it; the done event and the json
body carry them all, the same list either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.model.values import TokenVocab
from app.serving.logprobs import TokenScore, transcript_logprobs
from app.serving.transcripts import split_language
from app.types import TokenLogprob


class TextLogprobs:
    """Feed a piece's log-probs as they come; take the entries of the text's tokens once they are known."""

    def __init__(self, vocab: TokenVocab) -> None:
        self.vocab = vocab
        self.raw = b""
        self.entries: list[tuple[int, TokenLogprob]] = []
        """Text tokens with the byte offset where each ends."""
        self.sent = 0

    def add(self, entries: Sequence[TokenLogprob]) -> None:
        for entry in entries:
            if not self.vocab.is_special(entry.token):
                self.raw += self.vocab.piece(entry.token)
                self.entries.append((len(self.raw), entry))

    def release(self, final: bool) -> list[TokenScore]:
        """Entries not released yet, past the `lang:xx` prefix; none while the prefix is undecided."""
        text = self.raw.decode("utf-8", errors="replace")
        split = split_language(text, final)
        if split is None:
            return []
        prefix = len(text[: len(text) - len(split[0])].encode())
        fresh = [e for end, e in self.entries[self.sent :] if end > prefix]
        self.sent = len(self.entries)
        return transcript_logprobs(self.vocab, fresh)


def text_logprobs(vocab: TokenVocab, entries: Sequence[TokenLogprob]) -> list[TokenScore]:
    """A whole piece's entries at once: what the stream releases, joined."""
    reader = TextLogprobs(vocab)
    reader.add(entries)
    return reader.release(final=True)
