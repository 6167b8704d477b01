"""Mimi's streaming state: many streams stepped together, one 80 ms frame each per call.

`mimi.py` is the network; its `encode_frames` / `decode_frames` run a signal through it
from given states (the convolutions' carried input steps, the transformers' ring). This
module holds those states for `num_rows` streams (row i = stream i) and steps a row prefix
[0, B): `Mimi.streaming_encoder(num_rows)` / `streaming_decoder(num_rows)` make them. The
checked `step` validates its input (`validation.py`), `step_unchecked` is the capturable
step a replica runs; `reset_rows` and `move_row` are what a replica's row table needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from moshi_grpc.models.mimi import ConvStates
from moshi_grpc.models.validation import (
    check_active,
    check_batch,
    check_codes,
    check_pcm,
    check_rows,
)

if TYPE_CHECKING:
    from moshi_grpc.models.mimi import Mimi, Transformer

__all__ = ["MimiStreamingDecoder", "MimiStreamingEncoder"]


class _Streamer:
    """Rows of streaming state shared by the encoder and decoder.

    `num_rows` rows are preallocated; a step runs on the row prefix [0, B) of them, for
    any B <= num_rows, and leaves rows >= B untouched (a replica steps only the bucket
    holding its live sessions, see services/common/buckets.py). Every state tensor (conv
    caches, KV rings, positions) is written in place, so a captured CUDA graph replays the
    same addresses. `step` checks its inputs, then runs `step_unchecked`, which makes no
    host synchronisation (no `.item()`, no branch on tensor values); of the CPU forms,
    only the certified codebook search breaks that (see cpu_fast.py).
    """

    def __init__(self, mimi: Mimi, num_rows: int, transformer: Transformer, states):
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        self.mimi, self.num_rows = mimi, num_rows
        with torch.inference_mode():
            self._fresh = states(num_rows)
            self._states = [s.clone() for s in self._fresh]
            self._cache = transformer.new_cache(
                num_rows, mimi.config.resample_stride, mimi.device, mimi.dtype
            )
            # every prefix's views made once: a step then looks them up (a traced step
            # guards on what it read, so nothing it reads may change between calls)
            self._views = {b: [s[:b] for s in self._states] for b in range(1, num_rows + 1)}
            for b in range(1, num_rows + 1):
                self._cache.prefix(b)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every state tensor (conv caches, KV rings, positions), row first."""
        return [*self._states, *self._cache.tensors()]

    @property
    def positions(self) -> torch.Tensor:
        """Frames processed by each row since its last reset."""
        return self._cache.pos // self.mimi.config.resample_stride

    def _device_mask(self, active: torch.Tensor | None) -> torch.Tensor | None:
        """A checked `active` as `step_unchecked` takes it: None when every row advances
        (the same as the mask, minus the masking)."""
        if active is None or bool(active.all()):
            return None
        return active.to(self.mimi.device)

    def _commit(self, b: int, new: list[torch.Tensor], active: torch.Tensor | None) -> None:
        """The step's new conv states into rows [0, b), in place (masked rows keep theirs)."""
        for old, n in zip(self._views[b], new, strict=True):
            if active is not None:
                n = torch.where(active.view((-1,) + (1,) * (n.dim() - 1)), n, old)
            old.copy_(n)

    @torch.inference_mode()
    def reset_rows(self, rows: Sequence[int]) -> None:
        """Those rows start a fresh conversation; the others are untouched."""
        rows = check_rows(rows, self.num_rows)
        if not rows:
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mimi.device)
        for s, f in zip(self._states, self._fresh, strict=True):
            s.index_copy_(0, idx, f.index_select(0, idx))
        self._cache.reset_rows(idx)

    @torch.inference_mode()
    def move_row(self, src: int, dst: int) -> None:
        """Row `src`'s whole state (conv caches, KV rings, position) copied into row `dst`."""
        check_rows((src, dst), self.num_rows)
        if src == dst:
            return
        for s in self._states:
            s[dst].copy_(s[src])
        self._cache.move_row(src, dst)


class MimiStreamingEncoder(_Streamer):
    """Many streams, one 80 ms frame each per `step`, batched: stream i = row i."""

    def __init__(self, mimi: Mimi, num_rows: int):
        super().__init__(mimi, num_rows, mimi.encoder_transformer, mimi.encoder_state)

    @torch.inference_mode()
    def step(self, pcm: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """pcm (B, 1920) float -> codes (B, K) int64 for rows [0, B). Inactive rows: state
        kept, output unspecified. Rows >= B: untouched."""
        m = self.mimi
        b = check_batch(pcm, "pcm", m.frame_size, self.num_rows)
        check_active(active, b)
        check_pcm(pcm, offline=False, active=active)
        return self.step_unchecked(pcm.to(m.device, m.dtype), self._device_mask(active))

    def step_unchecked(self, pcm: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """`step` on checked inputs already on the model's device and dtype; `active` None
        (every row of the prefix advances) or a (B,) bool device tensor. No host
        synchronisation (capturable); call it under `torch.inference_mode()`."""
        b = pcm.shape[0]
        if active is not None:
            pcm = torch.where(active.view(-1, 1), pcm, torch.zeros_like(pcm))
        states = ConvStates(self._views[b])
        codes = self.mimi.encode_frames(pcm.unsqueeze(1), states, self._cache.prefix(b), active)
        self._commit(b, states.new, active)
        return codes[:, :, 0]


class MimiStreamingDecoder(_Streamer):
    """Many streams, one frame of codes each per `step`, batched: stream i = row i."""

    def __init__(self, mimi: Mimi, num_rows: int):
        super().__init__(mimi, num_rows, mimi.decoder_transformer, mimi.decoder_state)

    @torch.inference_mode()
    def step(self, codes: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, K) int -> pcm (B, 1920) for rows [0, B). Inactive rows: state kept,
        output unspecified. Rows >= B: untouched."""
        m = self.mimi
        b = check_batch(codes, "codes", m.num_codebooks, self.num_rows, exact=False)
        check_active(active, b)
        check_codes(codes, m.num_codebooks, m.cardinality, offline=False, active=active)
        return self.step_unchecked(codes.to(m.device, torch.long), self._device_mask(active))

    def step_unchecked(self, codes: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """`step` on checked int64 codes already on the model's device; `active` as in
        `MimiStreamingEncoder.step_unchecked`. Capturable."""
        b = codes.shape[0]
        if active is not None:
            codes = torch.where(active.view(-1, 1), codes, torch.zeros_like(codes))
        states = ConvStates(self._views[b])
        pcm = self.mimi.decode_frames(codes.unsqueeze(-1), states, self._cache.prefix(b), active)
        self._commit(b, states.new, active)
        return pcm[:, 0]
