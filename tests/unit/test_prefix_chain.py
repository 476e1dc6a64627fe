"""The prefix cache's block hashes (app/model/compute/prefix.py): a row's chain extended over what it generated
equals the chain computed from scratch, and the hashes are those of the plain per-block definition (so what is
cached, and what finds it, is the same as before the hashing was made incremental)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest

from app.model.compute.prefix import BLOCK, PrefixIndex, RowChain, chain, seed

AUDIO = 7
"""The audio token id of these prompts."""


def _reference(
    tokens: Sequence[int], prompt_len: int, audios: Sequence[tuple[bytes, int]], parent: bytes
) -> list[bytes]:
    """The block hashes by their definition, one token at a time: a block's audio flags (one byte each), its
    values (the id, or an audio token's index within its audio; 8 bytes little-endian each), then the keys of
    the audios it holds, in order."""
    owners = [i for i, (_, count) in enumerate(audios) for _ in range(count)]
    flags, values, owner = [], [], []
    seen = 0
    for position, token in enumerate(tokens):
        audio = position < prompt_len and token == AUDIO
        flags.append(1 if audio else 0)
        if audio:
            first = sum(count for _, count in audios[: owners[seen]])
            values.append(seen - first)
            owner.append(owners[seen])
            seen += 1
        else:
            values.append(token)
            owner.append(-1)
    hashes = []
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(bytes(flags[start : start + BLOCK]))
        digest.update(b"".join(v.to_bytes(8, "little", signed=True) for v in values[start : start + BLOCK]))
        for audio in sorted({o for o in owner[start : start + BLOCK] if o >= 0}):
            digest.update(audios[audio][0])
        parent = digest.digest()
        hashes.append(parent)
    return hashes


def _prompt(rng: random.Random, counts: list[int]) -> list[int]:
    """Text around runs of audio tokens, `counts[i]` for the i-th audio; a run may straddle blocks."""
    ids: list[int] = [rng.randrange(20, 3000) for _ in range(rng.randrange(0, 40))]
    for count in counts:
        ids += [AUDIO] * count + [rng.randrange(20, 3000) for _ in range(rng.randrange(1, 25))]
    return ids


CASES = [[], [37], [16, 5], [3, 40, 1]]


@pytest.mark.parametrize("counts", CASES)
def test_chain_is_the_per_block_definition(counts: list[int]) -> None:
    rng = random.Random(len(counts))
    audios = [(bytes([i]) * 16, count) for i, count in enumerate(counts)]
    parent = seed("tiny", None)
    for _ in range(5):
        prompt = _prompt(rng, counts)
        tokens = prompt + [rng.choice([AUDIO, rng.randrange(20, 3000)]) for _ in range(rng.randrange(0, 50))]
        assert chain(tokens, len(prompt), AUDIO, audios, parent) == _reference(tokens, len(prompt), audios, parent)


@pytest.mark.parametrize("counts", CASES)
def test_extended_chain_equals_the_chain_from_scratch(counts: list[int]) -> None:
    """A row's prompt hashed at its prefill, extended over each length it may leave its slot at (generated
    tokens include the audio token's id: only the prompt's count as audio)."""
    rng = random.Random(100 + len(counts))
    audios = [(bytes([i + 1]) * 16, count) for i, count in enumerate(counts)]
    parent = seed("tiny", "salt")
    for _ in range(5):
        prompt = _prompt(rng, counts)
        hashes = chain(prompt, len(prompt), AUDIO, audios, parent)
        assert hashes is not None
        generated = [rng.choice([AUDIO, rng.randrange(20, 3000)]) for _ in range(3 * BLOCK + 5)]
        for length in range(len(prompt), len(prompt) + len(generated) + 1):
            tokens = (prompt + generated)[:length]
            whole = chain(tokens, len(prompt), AUDIO, audios, parent)
            assert RowChain(audios, parent, list(hashes)).extend(tokens, len(prompt), AUDIO) == whole
            for start in range(len(whole or []) + 1):
                tail = chain(tokens, len(prompt), AUDIO, audios, whole[start - 1] if start else parent, start)
                assert tail == (whole or [])[start:]


def test_a_prompt_whose_audio_tokens_do_not_add_up_has_no_chain() -> None:
    prompt = [AUDIO] * 20 + [5] * 20
    assert chain(prompt, len(prompt), AUDIO, [(b"k", 19)], seed("tiny", None)) is None


def test_index_totals_follow_its_entries() -> None:
    """`PrefixIndex.totals`, kept as slots are assigned and forgotten, equals a count over every slot."""
    rng = random.Random(3)
    index = PrefixIndex(6)
    for _ in range(300):
        slot = rng.randrange(6)
        if rng.random() < 0.3:
            index.forget(slot)
        else:
            index.assign(slot, [bytes([rng.randrange(4), i]) for i in range(rng.randrange(0, 5))])
        blocks = [index.blocks(s) for s in range(6)]
        assert index.totals() == (sum(blocks), sum(1 for b in blocks if b))
