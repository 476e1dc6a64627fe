"""Batched generation with per-row sampling: prefill by transformers' forward pass, decode by the lean step.

`model.generate` forces one parameter set per batch and cannot take new rows mid-flight, so the decode loop
lives here: prefill a group of rows (right-padded, causal, explicit positions) with the real model, place each row's
keys and values in a slot of the preallocated cache (app/model/compute/slots.py), step all running rows with
the lean decoder (app/model/compute/decoder.py, replayed as a CUDA graph where there is one), sample each row
with its own parameters, drop finished rows and add freshly prefilled ones in between steps.

A step runs in slot order, padded to one of a few row counts and widths (`batch_sizes`, `widths`): its
shapes come from a short list, so CUDA can replay a captured graph of it. A batch's rows keep their order;
their slots need not follow it (the step's `order` input puts the logits back in row order), so a row that
leaves costs nothing and a row that joins is copied into its slot once. Slots are compacted only when the
rows' highest slot would pad the step to a larger size than their number needs.

Slot ownership: the states `prefill`, `select` and `merge` return hold slots; `select` and `merge` spend the
states they are given (their slots pass to the result, or are free), and a state dropped unspent frees its
slots when it is collected.

Prefix caching (`prefix_caching`, app/model/compute/prefix.py): a free slot keeps what its last row left, and
a prompt whose first full blocks a slot holds prefills only the rest, attending over that slot's positions.
A free holder is taken as it is (no copy); a holder a running row still decodes in is copied into the new
row's slot first (one device copy of the prefix per concurrent sharer: the step reads each row's slot as one
strided view, so rows cannot share blocks). A hit takes the lowest free holder. A row that reuses nothing
takes a free slot below the row count the step will be padded to, so it neither widens the step nor makes
it compact: the slot evicted is the cache's choice (empty first, then least recently used, anywhere), and
when that slot is higher, the low slot's cached prefix is first copied up into it (one copy of a prefix,
and the cache keeps all its slots).

`prefix_stats()` may be called from any thread: the generator's thread publishes an immutable `PrefixStats`
after each prefill, `select` and compaction, and the call returns the latest.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.audio import samples_key
from app.model.compute.attention import CAUSAL, install
from app.model.compute.decoder import decoder_for
from app.model.compute.encoder_cache import EncoderCache
from app.model.compute.features import LogMel
from app.model.compute.graphs import StepGraphs
from app.model.compute.kvcache import PrefillCache, SlotPrefillCache
from app.model.compute.prefix import BLOCK, PrefixIndex, PrefixStats, RowChain, chain, seed
from app.model.compute.row import Row
from app.model.compute.sampling import sample
from app.model.compute.slots import (
    CachePlan,
    CacheShape,
    SlotCache,
    batch_sizes,
    layer_devices,
    padded,
    plan,
    width_of,
    widths,
)
from app.model.compute.transfer import bind_thread, upload

__all__ = ["BatchGenerator", "BatchState", "Row", "sample"]

CPU_CACHE_BYTES = 4 * 2**30
"""The KV cache budget of a generator built without a plan (tests, benchmarks), as vLLM's CPU backend's default;
the server plans from the machine's RAM (app/model/compute/budget.py). Touched only as far as steps read."""
ENCODER_CACHE_BYTES = 256 * 2**20
"""The audio encoder cache's default bound: ~110 windows of 30 s for Voxtral Mini in bfloat16 (2.3 MB each)."""
DEFAULT_ROWS = 32
DEFAULT_LEN = 32768


@dataclass(eq=False)
class BatchState:
    """The rows currently decoding, in batch order, with the slot and the cached length of each."""

    rows: list[Row]
    slots: list[int]
    lengths: list[int]
    """Tokens of each row in the cache: its next token goes at this position."""
    spent: bool = field(default=False, repr=False)

    @property
    def width(self) -> int:
        """The longest row's tokens: what the running-token budget counts."""
        return max(self.lengths, default=0)


class BatchGenerator:
    """Stateless over requests: owns the model, the slot cache and the step, and turns rows into logits."""

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        log_mel: LogMel,
        cache: CachePlan | None = None,
        eager: bool = False,
        encoder_cache_bytes: int = ENCODER_CACHE_BYTES,
        group: Any = None,
        prefix_caching: bool = True,
    ) -> None:
        """`cache`: slots and positions (None: `DEFAULT_ROWS` rows of the model's context, up to
        `DEFAULT_LEN`); `eager`: never capture CUDA graphs (`--enforce-eager`); `encoder_cache_bytes`: the
        audio encoder cache's bound (app/model/compute/encoder_cache.py; 0: off); `group`: the tensor-parallel
        process group of a model loaded sharded (app/model/compute/parallel.py: this rank's cache holds its
        share of the KV heads; steps run eagerly), None in one process; `prefix_caching`: reuse the slots'
        cached prefixes (vLLM's `--enable-prefix-caching`), always recomputing at least a prompt's last token."""
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.text_config = model.config.text_config
        self.num_layers = int(self.text_config.num_hidden_layers)
        self.log_mel = log_mel
        ranks = 1 if group is None else int(group.size())
        self.shape = CacheShape.of(self.text_config, model.dtype).per_rank(ranks)
        self.ranks = ranks
        context = int(getattr(self.text_config, "max_position_embeddings", DEFAULT_LEN))
        self.plan = cache or default_plan(self.shape, context)
        self.cache = SlotCache(self.shape, self.plan, layer_devices(model))
        install()  # the attention of prefills whose masks are causal (app/model/compute/attention.py)
        self.decoder = decoder_for(model, group)
        self.graphs = StepGraphs(self.decoder, self.cache, self.device)
        self.sizes = batch_sizes(self.plan.slots)
        self.widths = widths(self.plan.max_len)
        self.eager = eager or group is not None
        self.audio_token_id = int(model.config.audio_token_id)
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self._states: weakref.WeakSet[BatchState] = weakref.WeakSet()
        self.prefix = PrefixIndex(self.plan.slots) if prefix_caching else None
        self._chains: weakref.WeakKeyDictionary[Row, RowChain] = weakref.WeakKeyDictionary()
        """Each running row's block hashes from its prefill, for `_retain` to extend: popped when the row leaves
        its slot, and gone with the row if it never does (a failed step)."""
        self.model_tag = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self._counts = [0] * 6  # requests, queries, hits, then the same for preempted rows' recomputes
        self._stats = PrefixStats(0, 0, 0, 0)

    @property
    def max_rows(self) -> int:
        """Rows that can decode at once: the cache's slots."""
        return self.plan.slots

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the step for every batch size and width (CUDA only, unless eager); call after warm-up. In
        inference mode, as every step runs: with autograd on, each graph's logits would carry a backward graph
        holding that graph's activations in the pool for as long as it lives."""
        bind_thread(self.device)
        if not self.eager:
            self.graphs.capture(self.sizes, self.widths)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Row]) -> tuple[BatchState, torch.Tensor]:
        """Run the prompts of `rows` (audio encoder included), place them in free slots; return their state and
        next-token logits."""
        bind_thread(self.device)
        # A preempted row comes back with its generated tokens: recompute them as prompt.
        prompts = [r.input_ids + r.generated for r in rows]
        width = max(len(p) for p in prompts)
        if width >= self.plan.max_len:
            raise ValueError(f"a prompt of {width} tokens does not fit {self.plan.max_len}")
        if self.prefix is not None:
            return self._prefill_cached(rows, prompts)
        slots = self._free(len(rows))
        hidden = self._prefill_into(prompts, [audio for r in rows for audio in r.audios], slots)
        state = self._hold(BatchState(list(rows), slots, [len(p) for p in prompts]))
        return state, self.project(hidden)

    def _prefill_cached(self, rows: Sequence[Row], prompts: list[list[int]]) -> tuple[BatchState, torch.Tensor]:
        """`prefill` with prefix caching: each row in a slot holding its longest cached prefix (or a copy of
        it), prefilled from there; rows with the same cached length in one forward pass."""
        chains = [self._row_chain(row, prompt) for row, prompt in zip(rows, prompts, strict=True)]
        pasts, slots, sources = self._place(prompts, chains)
        assert self.prefix is not None
        for slot in slots:
            self.prefix.forget(slot)  # about to be written: entries return once the prefill has succeeded
        try:
            hidden = self._prefill_groups(rows, prompts, pasts, slots, sources)
        except BaseException:  # a slot taken in place still holds its blocks below the row's cached length
            for slot, past, source, known in zip(slots, pasts, sources, chains, strict=True):
                if source < 0 and past and known is not None:
                    self.prefix.assign(slot, known.hashes[: past // BLOCK])
            self._publish()
            raise
        for row, slot, past, known, prompt in zip(rows, slots, pasts, chains, prompts, strict=True):
            if known is not None:
                self.prefix.assign(slot, known.hashes)
                self._chains[row] = known
            hit = past // BLOCK * BLOCK  # whole blocks, as vLLM counts (it recomputes a partly used one)
            part = 3 if row.generated else 0  # a preempted row's recompute, counted apart (as vLLM)
            for k, amount in enumerate((1, len(prompt), hit)):
                self._counts[part + k] += amount
            if not row.generated:  # a preempted row's recompute keeps what its first prefill found
                row.cached_tokens = hit
        self._publish()
        state = self._hold(BatchState(list(rows), slots, [len(p) for p in prompts]))
        return state, self.project(hidden)

    def _prefill_groups(
        self, rows: Sequence[Row], prompts: list[list[int]], pasts: list[int], slots: list[int], sources: list[int]
    ) -> torch.Tensor:
        """The device's part of `_prefill_cached`: copy the prefixes that need copying, then prefill the rows
        with the same cached length together; each row's last hidden state, in row order."""
        copies = [i for i, source in enumerate(sources) if source >= 0]
        if copies:
            self._copy([sources[i] for i in copies], [slots[i] for i in copies], max(pasts[i] for i in copies))
        groups: dict[int, list[int]] = {}
        for i, past in enumerate(pasts):
            groups.setdefault(past, []).append(i)
        pieces: list[torch.Tensor] = []
        order: list[int] = []
        for past, members in sorted(groups.items()):
            audios = [audio for i in members for audio in rows[i].audios]
            pieces.append(self._prefill_into([prompts[i] for i in members], audios, [slots[i] for i in members], past))
            order += members
        hidden = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if order != sorted(order):
            hidden = hidden.index_select(0, upload(np.argsort(order).tolist(), hidden.device, torch.long))
        return hidden

    def _place(self, prompts: list[list[int]], chains: list[RowChain | None]) -> tuple[list[int], list[int], list[int]]:
        """Each row's cached length (at most its prompt's length - 1: the last token is recomputed for its
        logits), its slot, and the slot its prefix is copied from (-1: none, the slot holds it already). The
        lowest free slot holding the prefix is taken as it is unless it caches more than twice what the row
        reuses: then the row gets a copy, and the longer prefix stays cached. Other rows get `_free` slots."""
        assert self.prefix is not None
        held = self._held()
        pasts, slots, sources = [0] * len(prompts), [-1] * len(prompts), [-1] * len(prompts)
        for i, (prompt, known) in enumerate(zip(prompts, chains, strict=True)):
            blocks, holders = self.prefix.match(known.hashes if known is not None else [])
            pasts[i] = min(blocks * BLOCK, len(prompt) - 1)
            if pasts[i] <= 0:
                pasts[i] = 0
                continue
            free = sorted(holders - held - set(slots))
            whole = [s for s in free if self.prefix.blocks(s) <= 2 * blocks]
            if whole:
                slots[i] = whole[0]
            else:  # held by a running row, taken by a row of this prefill, or more cached there than this
                sources[i] = free[0] if free else min(holders)  # row reuses: copied before any is written
            self.prefix.touch(slots[i] if slots[i] >= 0 else sources[i])
        taken = {s for s in slots if s >= 0}
        rows = len(held) + len(prompts)
        try:  # a free slot copied from stays cached, unless no other slot is left
            fresh = iter(self._fresh(slots.count(-1), taken | {s for s in sources if s >= 0}, rows))
        except RuntimeError:
            fresh = iter(self._fresh(slots.count(-1), taken, rows))
        return pasts, [s if s >= 0 else next(fresh) for s in slots], sources

    def _chain(self, row: Row, tokens: list[int]) -> list[bytes] | None:
        """The block hashes of `tokens` (`row`'s prompt, and what it generated) for the prefix index; None
        when its audio tokens do not divide evenly into its audios' 30 s windows."""
        known = self._row_chain(row, tokens)
        return None if known is None else known.hashes

    def _row_chain(self, row: Row, tokens: list[int]) -> RowChain | None:
        """`_chain`, with what extends it over tokens `row` generates later (its audios' keys, its seed)."""
        windows = [max(1, -(-len(audio) // self.log_mel.chunk_samples)) for audio in row.audios]
        total = row.input_ids.count(self.audio_token_id)
        if (windows and total % sum(windows)) or (total and not windows):
            return None
        audios = [(samples_key(a), w * total // sum(windows)) for a, w in zip(row.audios, windows, strict=True)]
        parent = seed(self.model_tag, row.cache_salt)
        hashes = chain(tokens, len(row.input_ids), self.audio_token_id, audios, parent)
        return None if hashes is None else RowChain(audios, parent, hashes)

    def _retain(self, row: Row, slot: int, length: int) -> None:
        """`row` left `slot` holding its first `length` tokens (prompt and generated): index them, extending
        the hashes its prefill computed (kept while it runs) over what it generated since."""
        assert self.prefix is not None
        tokens = (row.input_ids + row.generated)[:length]
        known = self._chains.pop(row, None)
        if known is None:
            hashes = self._chain(row, tokens)
        else:
            hashes = known.extend(tokens, len(row.input_ids), self.audio_token_id)
        if hashes is None:
            self.prefix.forget(slot)
        else:
            self.prefix.assign(slot, hashes)

    def prefix_stats(self) -> PrefixStats:
        """Prefix cache queries and hits since start (tokens), and what the free slots cached at the last
        prefill, `select` or compaction. Safe from any thread: a snapshot the generator's thread published."""
        return self._stats

    def _publish(self) -> None:
        """Publish a fresh `PrefixStats` (the generator's thread only: it reads the index and the live states)."""
        if self.prefix is None:
            return
        total, filled = self.prefix.totals()  # less what the running rows' slots hold: no walk over every slot
        running = [self.prefix.blocks(s) for s in self._held()]
        cached = (total - sum(running)) * BLOCK * self.shape.token_bytes * self.ranks
        requests, queries, hits, p_requests, p_queries, p_hits = self._counts
        slots = filled - sum(1 for b in running if b)
        self._stats = PrefixStats(queries, hits, slots, cached, requests, p_requests, p_queries, p_hits)

    def _move(self, sources: list[int], targets: list[int], length: int) -> None:
        """Copy positions below `length` of `sources` into `targets` (all read before any is written), keeping
        the prefix index true: the targets' entries are dropped before the copy, which may fail part way (a
        layer written, the next out of memory), and each target takes its source's blocks below `length` only
        once the copy has succeeded."""
        if self.prefix is None:
            self._copy(sources, targets, length)
            return
        kept = [(self.prefix.hashes(s)[: length // BLOCK], self.prefix.used(s)) for s in sources]
        for target in targets:
            self.prefix.forget(target)
        self._copy(sources, targets, length)
        for target, (blocks, used) in zip(targets, kept, strict=True):
            self.prefix.assign(target, blocks, used)

    def _prefill_into(
        self, prompts: list[list[int]], audios: list[np.ndarray], slots: list[int], past: int = 0
    ) -> torch.Tensor:
        """The device's part of a prefill: run `prompts` (their audios in order) and place each one's keys and
        values in its slot of `slots`; each prompt's last hidden state, [prompts, hidden].
        `past` > 0: the slots hold the prompts' first `past` positions already (`_extend_into`).

        Prompts are right-padded: each row's tokens sit at positions 0.. and padding comes after them, so the
        causal mask alone keeps every real token off the padding (none when no row is padded), and the
        attention may run as causal, with no mask, where a kernel can (app/model/compute/attention.py: on a
        GPU the flash kernel, skipping the masked half, grouped-query heads read in place); a padding mask
        would make transformers expand the keys and values to every query head and attend over the square."""
        if past:
            return self._extend_into(prompts, audios, slots, past)
        ids = self._right_padded(prompts)
        width, lengths = ids.shape[1], [len(p) for p in prompts]
        mask = None if min(lengths) == width else self._causal(len(prompts), 0, width)
        out = self._language(self._embed(ids, audios), mask, 0, PrefillCache(self.num_layers))
        kv = out.cache.kv()
        for i, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
            self.cache.place(slot, [(k[i, :, :length], v[i, :, :length]) for k, v in kv])
        return self._last_hidden(out.last_hidden_state, lengths)

    def _extend_into(
        self, prompts: list[list[int]], audios: list[np.ndarray], slots: list[int], past: int
    ) -> torch.Tensor:
        """Prefill positions `past`.. of `prompts` into their slots, attending over the slots' first `past`:
        the rest of each prompt right-padded (a padding position's keys land past the row's length, where
        the step masks them until it writes there), at positions `past`.. ."""
        tails = [p[past:] for p in prompts]
        ids = self._right_padded(tails)
        width = ids.shape[1]
        embeds = self._embed(ids, *self._tail_audio(prompts, audios, past))
        cache = SlotPrefillCache(self.cache.keys, self.cache.values, slots, past)
        out = self._language(embeds, self._causal(len(tails), past, width), past, cache)
        for slot in slots:
            self.cache.zeroed[slot] = max(self.cache.zeroed[slot], past + width)
        return self._last_hidden(out.last_hidden_state, [len(t) for t in tails])

    def _right_padded(self, seqs: list[list[int]]) -> torch.Tensor:
        """[rows, longest] token ids on the host: each row's at its start, padding after."""
        ids = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad_token_id, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
        return ids

    def _language(self, embeds: torch.Tensor, mask: torch.Tensor | None, past: int, cache: Any) -> Any:
        """transformers' decoder over `embeds` [rows, width, hidden] at positions `past`.., into `cache`; `mask`
        is causal and nothing else (app/model/compute/attention.py may run it as such)."""
        positions = upload(torch.arange(past, past + embeds.shape[1]).unsqueeze(0), self.device)
        return self.model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            **self._causal_kernel(mask),
        )

    def _last_hidden(self, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """[rows, hidden]: each right-padded row's hidden state at its last real position (of [rows, width,
        hidden]), a new tensor (a view would hold every position's)."""
        width = hidden.shape[1]
        if min(lengths) == width:
            last: torch.Tensor = hidden[:, -1, :].clone()
            return last
        flat = hidden.reshape(-1, hidden.shape[-1])
        ends = [i * width + length - 1 for i, length in enumerate(lengths)]
        picked: torch.Tensor = flat.index_select(0, upload(ends, flat.device, torch.long))
        return picked

    def _tail_audio(
        self, prompts: list[list[int]], audios: list[np.ndarray], past: int
    ) -> tuple[list[np.ndarray], list[int]]:
        """The audios (every row's, in order) owning a token at positions `past`.. of the prompts, and which of
        those audios' embeddings stand there: an audio wholly inside the cached part is not encoded. An audio's
        tokens are its 30 s windows' share of the prompts' (as `_chain` splits them); where they do not split
        evenly, every audio is kept."""
        keep: list[int] = []
        offset = 0
        for prompt in prompts:
            total, before = prompt.count(self.audio_token_id), prompt[:past].count(self.audio_token_id)
            keep += range(offset + before, offset + total)
            offset += total
        windows = np.asarray([max(1, -(-len(a) // self.log_mel.chunk_samples)) for a in audios], dtype=np.int64)
        if not keep or not len(windows) or offset % int(windows.sum()):
            return audios, keep
        owner = np.repeat(np.arange(len(audios)), windows * (offset // int(windows.sum())))
        needed = np.unique(owner[keep])
        index = np.cumsum(np.isin(owner, needed)) - 1  # each token's row among the needed audios' embeddings
        return [audios[int(i)] for i in needed], index[keep].tolist()

    def _causal(self, rows: int, past: int, queries: int) -> torch.Tensor | None:
        """The mask of `queries` new positions after `past` cached ones, nothing padded before them: each
        sees every position up to its own. sdpa and eager: their 4D form; other kernels: None (causal)."""
        kind = self._attention_kind()
        if kind not in ("sdpa", "eager"):
            return None
        keys = torch.arange(past + queries, device=self.device)
        allowed = keys.unsqueeze(0) <= torch.arange(past, past + queries, device=self.device).unsqueeze(1)
        allowed = allowed[None, None].expand(rows, 1, queries, past + queries)
        if kind == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.where(allowed, torch.zeros((), device=self.device, dtype=dtype), torch.finfo(dtype).min)

    def _causal_kernel(self, mask: torch.Tensor | None) -> dict[str, bool]:
        """The forward's keyword arguments saying its `mask` is causal and nothing else (sdpa: see
        app/model/compute/attention.py), or none."""
        return {CAUSAL: True} if mask is not None and self._attention_kind() == "sdpa" else {}

    def _attention_kind(self) -> str | None:
        """The attention implementation transformers' modules run (`--attn-implementation`)."""
        kind = getattr(self.model.config, "_attn_implementation", None)
        return None if kind is None else str(kind)

    @torch.inference_mode()
    def step(self, state: BatchState, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Feed one sampled token per row (host ids: uploaded with the step's other inputs in one pinned copy);
        return the next logits, [rows, vocab], in the state's row order."""
        assert not state.spent, "a state passed to select or merge is spent"
        bind_thread(self.device)
        longest = max(state.lengths) + 1
        if longest > self.plan.max_len:
            raise ValueError(f"a row reached the cache's {self.plan.max_len} positions")
        self._compact(state)
        rows = padded(max(state.slots) + 1, self.sizes)
        width = width_of(longest, self.plan.max_len)
        slots = np.asarray(state.slots)
        packed = np.zeros((4, rows), dtype=np.int64)  # numpy: the host's bookkeeping launches nothing
        packed[0] = self.pad_token_id
        packed[2] = self.cache.scratch
        packed[0, slots] = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else list(tokens)
        packed[1, slots] = state.lengths
        packed[2, slots] = slots
        packed[3, : len(slots)] = slots
        logits = self._run(torch.from_numpy(packed), width)
        state.lengths = [n + 1 for n in state.lengths]
        return logits[: len(state.rows)]

    def _run(self, host: torch.Tensor, width: int) -> torch.Tensor:
        """The device's part of a step: the step's inputs `host` ([4, rows], `LeanDecoder`'s `packed`) over
        `width` positions; the logits of every step row, in the order of `host[3]`."""
        self.cache.ready(width, host.shape[1])
        return self.graphs.run(host.pin_memory() if self.device.type == "cuda" else host, width)

    def _copy(self, sources: list[int], targets: list[int], length: int) -> None:
        """The device's part of a slot move: the first `length` positions of each source slot into its target."""
        self.cache.copy(sources, targets, length)

    def _embed(self, ids: torch.Tensor, audios: list[np.ndarray], keep: list[int] | None = None) -> torch.Tensor:
        """The prompt's input embeddings with each audio's in place of its audio tokens, in prompt order (what
        transformers' Voxtral does, with the audio tokens found on the host: no read-back). `keep`: only
        these of the audios' embeddings stand in `ids` (the rest of a prompt whose start is cached)."""
        embeds: torch.Tensor = self.model.model.get_input_embeddings()(upload(ids, self.device))
        if not audios or keep == []:
            return embeds
        audio = self._audio_embeddings(audios)
        if keep is not None and len(keep) < audio.shape[0]:
            audio = audio.index_select(0, upload(keep, audio.device, torch.long))
        where = np.flatnonzero(ids.numpy().reshape(-1) == self.audio_token_id)
        if len(where) != audio.shape[0]:
            raise ValueError(f"{len(where)} audio tokens in the prompt, {audio.shape[0]} audio embeddings")
        flat = embeds.view(-1, embeds.shape[-1])
        flat.index_copy_(0, upload(torch.from_numpy(where), self.device), audio.to(flat.dtype))
        return embeds

    def _audio_embeddings(self, audios: list[np.ndarray]) -> torch.Tensor:
        """The projected audio embeddings of `audios`, one after another: from the encoder cache where it holds
        them, the rest encoded together and kept."""
        keys = [samples_key(audio) for audio in audios]
        found = [self.encoder_cache.get(key) for key in keys]
        missing = [i for i, embedding in enumerate(found) if embedding is None]
        if missing:
            windows = [self.log_mel(audios[i]) for i in missing]
            features = torch.cat(windows).to(self.device, self.model.dtype)
            encoded = self.model.model.get_audio_features(features, return_dict=True).pooler_output
            per_window = encoded.shape[0] // features.shape[0]
            start = 0
            for i, window in zip(missing, windows, strict=True):
                count = window.shape[0] * per_window
                part = encoded[start : start + count]
                part = part.clone() if len(missing) > 1 else part  # a view would hold the whole batch's
                self.encoder_cache.put(keys[i], part)
                found[i] = part
                start += count
        return torch.cat([f for f in found if f is not None])

    def _compact(self, state: BatchState) -> None:
        """Move the rows of high slots into free low ones when they would pad the step beyond what their
        number needs (one copy of each moved row's history)."""
        need = padded(len(state.slots), self.sizes)
        if padded(max(state.slots) + 1, self.sizes) == need:
            return
        held = self._held(besides=state)
        free = [s for s in range(need) if s not in held and s not in state.slots]
        if self.prefix is not None:
            free = self.prefix.eviction_order(free)
        moving = [i for i, slot in enumerate(state.slots) if slot >= need][: len(free)]
        if not moving:  # every low slot is held by a state not yet merged: pad this step wider
            return
        targets = free[: len(moving)]
        sources = [state.slots[i] for i in moving]
        length = max(state.lengths[i] for i in moving)
        if self.prefix is None:
            self._copy(sources, targets, length)
        else:  # a target's cached prefix is swapped into the slot its row leaves, not lost
            swapped = [(t, s) for t, s in zip(targets, sources, strict=True) if self.prefix.blocks(t)]
            length = max([length] + [self.prefix.blocks(t) * BLOCK for t, _ in swapped])
            pairs = list(zip(sources, targets, strict=True)) + swapped
            self._move([s for s, _ in pairs], [t for _, t in pairs], length)
        for i, slot in zip(moving, targets, strict=True):
            state.slots[i] = slot
        self._publish()

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of each row's last hidden state ([rows, hidden] -> [rows, vocab])."""
        logits: torch.Tensor = self.model.lm_head(hidden)
        return logits.float()

    def select(self, state: BatchState, keep: list[int]) -> BatchState:
        """The rows at `keep`, in that order (a repeated index copies the row into a free slot, once); `state`
        is spent, and the slots of the rows not kept are free."""
        seen: set[int] = set()
        slots: list[int] = []
        copies: list[int] = []
        for i in keep:
            slots.append(state.slots[i] if i not in seen else -1)
            if i in seen:
                copies.append(len(slots) - 1)
            seen.add(i)
        state.spent = True
        if self.prefix is not None:  # the rows that leave: their slots cache what they hold
            for i in sorted(set(range(len(state.rows))) - seen):
                self._retain(state.rows[i], state.slots[i], state.lengths[i])
        if copies:
            fresh = self._fresh(len(copies), set(slots), len(self._held()) + len(keep))
            sources = [state.slots[keep[j]] for j in copies]
            self._move(sources, fresh, max(state.lengths[keep[j]] for j in copies))
            for j, slot in zip(copies, fresh, strict=True):
                slots[j] = slot
        rows = [state.rows[i] for i in keep]
        selected = self._hold(BatchState(rows, slots, [state.lengths[i] for i in keep]))
        self._publish()
        return selected

    def release(self, state: BatchState) -> None:
        """Free the slots of `state`, whose step failed, at once (not when it is collected: a failure's traceback,
        held by a log record, may keep it alive) and cache nothing of them: a failed step may have written part
        of its layers. `state` is spent."""
        state.spent = True
        if self.prefix is not None:
            for slot in state.slots:
                self.prefix.forget(slot)
            self._publish()

    def merge(self, a: BatchState, b: BatchState) -> BatchState:
        """One state with the rows of both, in that order; no cache moves. Both are spent."""
        a.spent = b.spent = True
        return self._hold(BatchState(a.rows + b.rows, a.slots + b.slots, a.lengths + b.lengths))

    # -- slots ---------------------------------------------------------------------------------------
    def _hold(self, state: BatchState) -> BatchState:
        self._states.add(state)
        return state

    def _held(self, besides: BatchState | None = None) -> set[int]:
        return {s for st in list(self._states) if not st.spent and st is not besides for s in st.slots}

    def _fresh(self, count: int, besides: set[int], rows: int) -> list[int]:
        """`count` free slots (not `besides`) for rows that reuse nothing, below the step's padded size for
        `rows` running rows where there are free ones: the cache evicts the slots `_free` names, and each of
        them at or above that size takes the cached prefix of a free low slot first (copied up), which the
        row gets instead."""
        chosen = self._free(count, besides)
        if self.prefix is None:
            return chosen
        bound = padded(min(self.plan.slots, rows), self.sizes)
        taken = self._held() | besides | set(chosen)
        low = self.prefix.eviction_order([s for s in range(bound) if s not in taken])
        high = [i for i, slot in enumerate(chosen) if slot >= bound][: len(low)]
        if high:
            spare = low[: len(high)]
            length = max(self.prefix.blocks(s) for s in spare) * BLOCK
            self._move(spare, [chosen[i] for i in high], length)
            for i, slot in zip(high, spare, strict=True):
                chosen[i] = slot
        return chosen

    def _free(self, count: int, besides: set[int] | None = None) -> list[int]:
        """`count` slots no live state holds (nor `besides`): the lowest, or with prefix caching the empty
        ones first, then those whose cached prefix was used least recently."""
        for attempt in range(2):
            taken = self._held() | (besides or set())
            free = [s for s in range(self.plan.slots) if s not in taken]
            free = (self.prefix.eviction_order(free) if self.prefix is not None else free)[:count]
            if len(free) == count:
                return free
            if attempt == 0:
                gc.collect()  # a state dropped inside a reference cycle (an exception's traceback) frees here
        raise RuntimeError(f"no free KV cache slot for {count} rows ({self.plan.slots} slots)")


def default_plan(shape: CacheShape, max_position: int) -> CachePlan:
    """`DEFAULT_ROWS` rows of the model's context (at most `DEFAULT_LEN`) within the CPU budget."""
    return plan(shape, DEFAULT_ROWS, min(max_position, DEFAULT_LEN), CPU_CACHE_BYTES)
