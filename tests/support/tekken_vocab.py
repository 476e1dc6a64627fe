"""Tekken tokenizers of every tool-call format (v7, v11, v13), built offline, and their vocabularies."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

from app.model.text.vocabulary import read_vocab
from app.model.tiny import build_tekken
from app.model.values import TokenVocab

VERSIONS = ("v7", "v11", "v13")


@cache
def instruct(version: str) -> Any:
    """mistral-common's own instruct tokenizer: the oracle for how calls are written."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = Path(mkdtemp(prefix=f"tekken-{version}-")) / "tekken.json"
    path.write_text(json.dumps(build_tekken(version)), encoding="utf-8")
    return MistralTokenizer.from_file(str(path)).instruct_tokenizer


@cache
def vocab(version: str) -> TokenVocab:
    return read_vocab(instruct(version).tokenizer)


def text_ids(version: str, text: str) -> list[int]:
    return vocab(version).encode(text)
