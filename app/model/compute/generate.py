"""Batched generation with per-row sampling: prefill by transformers' forward pass, decode by the lean step.

`model.generate` forces one parameter set per batch and cannot take new rows mid-flight, so the decode loop
lives here: prefill a group of rows (left-padded, explicit positions) with the real model, place each row's
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
from app.model.compute.decoder import decoder_for
from app.model.compute.encoder_cache import EncoderCache
from app.model.compute.features import LogMel
from app.model.compute.graphs import StepGraphs
from app.model.compute.kvcache import PrefillCache
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
from app.model.compute.transfer import upload

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
    ) -> None:
        """`cache`: slots and positions (None: `DEFAULT_ROWS` rows of the model's context, up to
        `DEFAULT_LEN`); `eager`: never capture CUDA graphs (`--enforce-eager`); `encoder_cache_bytes`: the
        audio encoder cache's bound (app/model/compute/encoder_cache.py; 0: off); `group`: the tensor-parallel
        process group of a model loaded sharded (app/model/compute/parallel.py: this rank's cache holds its
        share of the KV heads; steps run eagerly), None in one process."""
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.text_config = model.config.text_config
        self.num_layers = int(self.text_config.num_hidden_layers)
        self.log_mel = log_mel
        ranks = 1 if group is None else int(group.size())
        self.shape = CacheShape.of(self.text_config, model.dtype).per_rank(ranks)
        context = int(getattr(self.text_config, "max_position_embeddings", DEFAULT_LEN))
        self.plan = cache or default_plan(self.shape, context)
        self.cache = SlotCache(self.shape, self.plan, layer_devices(model))
        self.decoder = decoder_for(model, group)
        self.graphs = StepGraphs(self.decoder, self.cache, self.device)
        self.sizes = batch_sizes(self.plan.slots)
        self.widths = widths(self.plan.max_len)
        self.eager = eager or group is not None
        self.audio_token_id = int(model.config.audio_token_id)
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self._states: weakref.WeakSet[BatchState] = weakref.WeakSet()

    @property
    def max_rows(self) -> int:
        """Rows that can decode at once: the cache's slots."""
        return self.plan.slots

    def capture(self) -> None:
        """Capture the step for every batch size and width (CUDA only, unless eager); call after warm-up."""
        if not self.eager:
            self.graphs.capture(self.sizes, self.widths)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Row]) -> tuple[BatchState, torch.Tensor]:
        """Run the prompts of `rows` (audio encoder included), place them in free slots; return their state and
        next-token logits."""
        # A preempted row comes back with its generated tokens: recompute them as prompt.
        prompts = [r.input_ids + r.generated for r in rows]
        width = max(len(p) for p in prompts)
        if width >= self.plan.max_len:
            raise ValueError(f"a prompt of {width} tokens does not fit {self.plan.max_len}")
        slots = self._free(len(rows))
        hidden = self._prefill_into(prompts, [audio for r in rows for audio in r.audios], slots)
        state = self._hold(BatchState(list(rows), slots, [len(p) for p in prompts]))
        return state, self.project(hidden)

    def _prefill_into(self, prompts: list[list[int]], audios: list[np.ndarray], slots: list[int]) -> torch.Tensor:
        """The device's part of a prefill: run `prompts` (left-padded, their audios in order) and place each
        one's keys and values in its slot of `slots`; each prompt's last hidden state, [prompts, hidden]."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        lengths = [len(p) for p in prompts]
        out = self.model.model.language_model(
            inputs_embeds=self._embed(ids, audios),
            attention_mask=self._mask(upload(mask, self.device), lengths, width),
            position_ids=upload(positions, self.device),
            cache=PrefillCache(self.num_layers),
            use_cache=True,
        )
        kv = out.cache.kv()
        for i, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
            self.cache.place(slot, [(k[i, :, width - length :], v[i, :, width - length :]) for k, v in kv])
        hidden: torch.Tensor = out.last_hidden_state[:, -1, :]
        return hidden

    @torch.inference_mode()
    def step(self, state: BatchState, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Feed one sampled token per row (host ids: uploaded with the step's other inputs in one pinned copy);
        return the next logits, [rows, vocab], in the state's row order."""
        assert not state.spent, "a state passed to select or merge is spent"
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

    def _embed(self, ids: torch.Tensor, audios: list[np.ndarray]) -> torch.Tensor:
        """The prompt's input embeddings with each audio's in place of its audio tokens, in prompt order (what
        transformers' Voxtral does, with the audio tokens found on the host: no read-back)."""
        embeds: torch.Tensor = self.model.model.get_input_embeddings()(upload(ids, self.device))
        if not audios:
            return embeds
        audio = self._audio_embeddings(audios)
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
        moving = [i for i, slot in enumerate(state.slots) if slot >= need][: len(free)]
        if not moving:  # every low slot is held by a state not yet merged: pad this step wider
            return
        targets = free[: len(moving)]
        self._copy([state.slots[i] for i in moving], targets, max(state.lengths[i] for i in moving))
        for i, slot in zip(moving, targets, strict=True):
            state.slots[i] = slot

    def _mask(self, mask: torch.Tensor, lengths: list[int], queries: int) -> torch.Tensor | None:
        """The attention mask handed to transformers for `queries` new positions, in the form its
        `create_causal_mask` builds from the 2D `mask`, decided on the host: given a 2D mask it asks the device
        whether there is padding (masking_utils' `fast_all` in an `if`, a sync every step). No padding: None,
        from which it builds what an all-ones mask gives. Padding, for sdpa and eager attention: their 4D
        mask, causal and padded, the same values (True, or 0, where a row attends). Other kernels: the 2D mask."""
        width = mask.shape[1]
        if min(lengths) == width:
            return None
        kind = getattr(self.model.config, "_attn_implementation", None)
        if kind not in ("sdpa", "eager"):
            return mask
        keys = torch.arange(width, device=mask.device)
        causal = keys.unsqueeze(0) <= torch.arange(width - queries, width, device=mask.device).unsqueeze(1)
        allowed = causal[None, None] & mask.bool()[:, None, None, :]
        if kind == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.where(allowed, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)

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
        if copies:
            fresh = self._free(len(copies), besides=set(slots))
            sources = [state.slots[keep[j]] for j in copies]
            self._copy(sources, fresh, max(state.lengths[keep[j]] for j in copies))
            for j, slot in zip(copies, fresh, strict=True):
                slots[j] = slot
        rows = [state.rows[i] for i in keep]
        return self._hold(BatchState(rows, slots, [state.lengths[i] for i in keep]))

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

    def _free(self, count: int, besides: set[int] | None = None) -> list[int]:
        """The `count` lowest slots no live state holds (nor `besides`)."""
        for attempt in range(2):
            taken = self._held() | (besides or set())
            free = [s for s in range(self.plan.slots) if s not in taken][:count]
            if len(free) == count:
                return free
            if attempt == 0:
                gc.collect()  # a state dropped inside a reference cycle (an exception's traceback) frees here
        raise RuntimeError(f"no free KV cache slot for {count} rows ({self.plan.slots} slots)")


def default_plan(shape: CacheShape, max_position: int) -> CachePlan:
    """`DEFAULT_ROWS` rows of the model's context (at most `DEFAULT_LEN`) within the CPU budget."""
    return plan(shape, DEFAULT_ROWS, min(max_position, DEFAULT_LEN), CPU_CACHE_BYTES)
