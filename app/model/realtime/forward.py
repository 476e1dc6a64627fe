"""One batched forward of Voxtral Realtime over many streams: each row its own positions, caches and delay.

transformers' own modules compute everything (convolutions, encoder and decoder layers, projector, head), each
called as `VoxtralRealtimeForConditionalGeneration.generate` calls it while streaming; only the caches differ:
the rows' slots in a `StreamPool` stand in for transformers' per-call caches (`RingView` is what the attention
layers see), so rows at different positions and with different delays share one forward. The delay enters
the decoder only through `t_cond`, a per-vector function (`ada_rms_norm` of the time embedding), so a
[rows, 1, hidden] `t_cond` conditions each row on its own delay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from app.model.realtime.pool import RingView, StreamPool
from app.model.realtime.timing import FRAME_MS, MAX_DELAY_MS


@dataclass
class Rows:
    """One forward's rows: slots, features, previous tokens, positions and delays (all on the model's device).

    `features` [rows, mels, frames]: the log-mel of each row's new audio; `tokens` [rows, new]: decoder inputs
    (the prompt at the first forward, else the last emitted token); `encoder_seen` / `decoder_seen` [rows]:
    positions each stack has seen; `delays` [rows] delay tokens; `span`: when the slots are one contiguous
    range (slots[i] == span.start + i), the caches are read as views of it, with no gather; `fresh`: every
    row's first forward (positions from 0, nothing in its rings to attend to)."""

    slots: torch.Tensor
    features: torch.Tensor
    tokens: torch.Tensor
    encoder_seen: torch.Tensor
    decoder_seen: torch.Tensor
    delays: torch.Tensor
    span: slice | None = None
    fresh: bool = False
    writes: torch.Tensor | None = None
    """[rows] the slot each row's new state goes to (convolution context, keys and values): its own, or the
    scratch slot for a row that only fills the step while reading a stream's slot; None: `slots`."""

    @property
    def targets(self) -> torch.Tensor:
        return self.slots if self.writes is None else self.writes


class RealtimeForward:
    """Greedy next tokens for a batch of rows, updating their slots' caches in place."""

    def __init__(self, model: Any, pool: StreamPool) -> None:
        self.model = model
        self.pool = pool
        inner = model.model
        self.tower = inner.audio_tower
        self.text = inner.language_model
        self.projector = inner.multi_modal_projector
        self.time_embedding = inner.time_embedding
        self.downsample = int(model.config.downsample_factor)
        self.audio_hidden = int(model.config.audio_config.hidden_size)
        with torch.inference_mode():
            self.t_conds = torch.stack([self._t_cond(d) for d in range(MAX_DELAY_MS // FRAME_MS + 1)])
        """Every delay's `t_cond`, computed once: a row's is looked up on the device (reading the delays back
        to the host to compute them would make it wait for the whole encoder, every forward)."""

    @torch.inference_mode()
    def __call__(self, rows: Rows) -> torch.Tensor:
        """[rows] the greedy token after each row's last position."""
        audio = self._audio_embeds(rows)
        embeds = self.text.embed_tokens(rows.tokens) + audio
        hidden = self._decode(embeds, rows)
        logits: torch.Tensor = self.model.lm_head(hidden[:, -1:])
        return logits[:, -1].argmax(dim=-1)

    def _conv(self, conv: Any, state: torch.Tensor, x: torch.Tensor, rows: Rows) -> torch.Tensor:
        """A causal convolution continuing each row's left context, which it then advances (in its target)."""
        padded = torch.cat([state[rows.slots], x], dim=-1)
        state[rows.targets] = x[:, :, -conv.left_pad :]
        return torch.nn.functional.gelu(torch.nn.Conv1d.forward(conv, padded))

    def _audio_embeds(self, rows: Rows) -> torch.Tensor:
        """[rows, new, hidden]: the encoder and projector over each row's new mel frames."""
        conv = self.pool.conv
        x = self._conv(self.tower.embedder.conv1, conv.conv1, rows.features, rows)
        x = self._conv(self.tower.embedder.conv2, conv.conv2, x, rows).permute(0, 2, 1)
        view = RingView(
            self.pool.encoder, rows.slots, rows.encoder_seen, x.shape[1], rows.span, rows.fresh, rows.targets
        )
        x = self._layers(self.tower, x, view, {})
        x = self.tower.norm(x)
        x = x.reshape(x.shape[0], -1, self.audio_hidden * self.downsample)
        return self.projector(x)  # type: ignore[no-any-return]

    def _decode(self, embeds: torch.Tensor, rows: Rows) -> torch.Tensor:
        t_cond = self.t_conds.index_select(0, rows.delays)
        view = RingView(
            self.pool.decoder, rows.slots, rows.decoder_seen, embeds.shape[1], rows.span, rows.fresh, rows.targets
        )
        return self.text.norm(self._layers(self.text, embeds, view, {"t_cond": t_cond}))  # type: ignore[no-any-return]

    def _t_cond(self, delay: int) -> torch.Tensor:
        """[1, hidden] the time embedding of `delay`, computed as transformers computes it."""
        dtype = self.model.lm_head.weight.dtype
        device = self.model.lm_head.weight.device
        return self.time_embedding(torch.full((1,), delay, device=device, dtype=dtype))[None]  # type: ignore[no-any-return]

    def _layers(self, stack: Any, x: torch.Tensor, view: RingView, extra: dict[str, Any]) -> torch.Tensor:
        """Every layer of `stack` over `x` [rows, new, hidden] at the rows' positions, then the ring written."""
        positions = view.seen[:, None] + torch.arange(x.shape[1], device=x.device)
        embeddings = stack.rotary_emb(x, position_ids=positions)
        mask = view.mask(x.shape[1])
        for layer in stack.layers:
            x = layer(
                x,
                attention_mask=mask,
                position_ids=positions,
                cache=view,
                use_cache=True,
                position_embeddings=embeddings,
                **extra,
            )
        view.commit()
        return x
