"""Per-row streaming state shared by the Mimi and Moshi transformers.

Both models step many streams at once, each at its own position: row `i` of every state
tensor is stream `i`, and a call steps the row prefix `[0, B)` (a replica steps only the
bucket holding its live sessions). This module holds what the two transformers share:

- `RingKVCache`: every layer's keys and values in preallocated ring buffers, plus each row's
  position (steps written since its reset). Step `p` of a row lives at ring index
  `p % capacity`; keys are stored already rotated (RoPE), so the order inside the ring does
  not matter to attention.
- `ring_key_positions` / `ring_mask`: which absolute step each ring entry holds and which of
  them a query may see (causal, within the context, never-written entries hidden).

Everything is written in place with `torch.where` for masked rows and no Python branch on
per-row values, so a step that uses it can be captured (CUDA graphs) or traced.
"""

from __future__ import annotations

import torch

__all__ = ["RingKVCache", "ring_key_positions", "ring_mask"]


class RingKVCache:
    """Keys and values of `layers` attention layers for `rows` streams, preallocated.

    Layer `l` holds keys `k[l] [rows, heads, capacity, head_dim]` and values `v[l]`, either
    row-major like the keys or, with `values_transposed`, as `[rows, heads, head_dim,
    capacity]`. The transposed layout suits attention written out as two products over
    the ring (the LM's single query per row, `lm.attend_ring`: keys and values then share
    one layout, so either product form streams both); row-major values suit
    `scaled_dot_product_attention` (Mimi), which is several times slower over a transposed
    view. `pos [rows]` counts the
    steps each row has written since its reset (its next absolute position).

    Keys may be stored in another dtype than values (`value_dtype`; the LM's `kv_f32_f16`
    CPU form keeps float32 keys and float16 values for a half-precision model).
    """

    def __init__(
        self,
        layers: int,
        rows: int,
        heads: int,
        capacity: int,
        head_dim: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        value_dtype: torch.dtype | None = None,
        values_transposed: bool = False,
    ) -> None:
        self.capacity = capacity
        self.values_transposed = values_transposed
        k_shape = (rows, heads, capacity, head_dim)
        v_shape = (rows, heads, head_dim, capacity) if values_transposed else k_shape
        vdt = value_dtype or dtype
        self.k = [torch.zeros(k_shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(v_shape, device=device, dtype=vdt) for _ in range(layers)]
        self.pos = torch.zeros(rows, device=device, dtype=torch.long)
        self._row_ids = torch.arange(rows, device=device)
        self._prefixes: dict[int, RingKVCache] = {}

    # ---- facts ---------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.pos.shape[0]

    @property
    def key_dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def value_dtype(self) -> torch.dtype:
        return self.v[0].dtype

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor (keys, values, positions), row first."""
        return [*self.k, *self.v, self.pos]

    def nbytes_per_row(self) -> int:
        """Bytes of keys and values one stream occupies (every layer)."""
        return sum(t[0].nbytes for t in (*self.k, *self.v))

    # ---- the rows a call works on ------------------------------------------------------
    def prefix(self, b: int) -> RingKVCache:
        """The same buffers restricted to rows `[0, b)`: views, so writes land in place.

        Made once per `b` and then looked up: a traced step guards on the objects it read,
        so call it for every bucket before tracing."""
        view = self._prefixes.get(b)
        if view is None:
            view = self._prefixes[b] = self._view(slice(0, b))
        return view

    def row(self, row: int) -> RingKVCache:
        """Row `row` alone as a one-row cache (views: writes land in place), for a call
        that works on one row wherever it lies (a prefill)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range 0..{self.rows - 1}")
        return self._view(slice(row, row + 1))

    def _view(self, rows: slice) -> RingKVCache:
        view = RingKVCache.__new__(RingKVCache)
        view.capacity = self.capacity
        view.values_transposed = self.values_transposed
        view.k = [k[rows] for k in self.k]
        view.v = [v[rows] for v in self.v]
        view.pos = self.pos[rows]
        view._row_ids = self._row_ids[: rows.stop - rows.start]
        view._prefixes = {}
        return view

    def ring_index(self, batch: int, steps: int) -> torch.Tensor:
        """Ring indices `[batch, steps]` of the next `steps` positions of rows `[0, batch)`."""
        offsets = torch.arange(steps, device=self.pos.device)
        return (self.pos[:batch, None] + offsets) % self.capacity

    # ---- write / read --------------------------------------------------------------------
    def write(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        index: torch.Tensor,
        active: torch.Tensor | None = None,
    ) -> None:
        """Store `k, v [B, H, T, D]` of rows `[0, B)` at ring indices `index [B, T]`.

        With `active [B]` (bool), rows where it is False keep their entries bit for bit (one
        gather more). Without it every row writes: a caller whose masked rows write harmless
        entries (Mimi: entries no query reads before the row's next real step overwrites
        them) saves the gather.

        Written as an indexed assignment (`index_put_`): CPU `scatter_` on half-precision
        buffers copies the whole buffer per call."""
        b, _, t, _ = k.shape
        keys, values = self.k[layer], self.v[layer]
        rows = self._row_ids[:b, None].expand(b, t)  # (B, T)
        # two advanced indices around slices put their (B, T) shape first: (B, T, H, D)
        k = k.transpose(1, 2).to(keys.dtype)
        v = v.transpose(1, 2).to(values.dtype)
        if active is not None:
            keep = ~active.view(b, 1, 1, 1)
            k = torch.where(keep, keys[rows, :, index], k)
            v = torch.where(keep, self._values_at(values, rows, index), v)
        keys[rows, :, index] = k
        if self.values_transposed:
            values[rows, :, :, index] = v
        else:
            values[rows, :, index] = v

    def _values_at(
        self, values: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """The entries at `(rows, index) [B, T]`, as `[B, T, H, D]` in either layout."""
        return values[rows, :, :, index] if self.values_transposed else values[rows, :, index]

    def read(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` ring entries of rows `[0, batch)` as views (no copy): keys
        `[B, H, length, D]` and values in their layout (`[B, H, D, length]` transposed)."""
        values = self.v[layer][:batch]
        values = values[..., :length] if self.values_transposed else values[:, :, :length]
        return self.k[layer][:batch, :, :length], values

    # ---- positions -----------------------------------------------------------------------
    def commit(self, batch: int, steps: int, active: torch.Tensor | None = None) -> None:
        """Rows `[0, batch)` advance by `steps` positions (only the `active` ones, if given)."""
        pos = self.pos[:batch]
        if active is None:
            pos.add_(steps)
        else:
            pos.add_(active.long() * steps)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Position 0 for `rows` (long indices). The buffers are not cleared: entries older
        than a row's position are hidden by `ring_mask` until the row overwrites them."""
        self.pos.index_fill_(0, rows, 0)

    def move_row(self, src: int, dst: int) -> None:
        """Row `src`'s whole cache (every layer and its position) copied into row `dst`."""
        for t in self.tensors():
            t[dst].copy_(t[src])

    def copy_out(self, row: int, steps: int) -> list[torch.Tensor]:
        """Host copies of the entries of `row`'s first `steps` positions (ring indices
        `0..steps-1`, `steps <= capacity`), keys then values of every layer, each in its
        layout: a snapshot that `copy_in` puts back into any row."""
        out = [k[row, :, :steps].to("cpu", copy=True) for k in self.k]
        for v in self.v:
            part = v[row, :, :, :steps] if self.values_transposed else v[row, :, :steps]
            out.append(part.to("cpu", copy=True))
        return out

    def copy_in(self, row: int, snapshot: list[torch.Tensor]) -> None:
        """`copy_out`'s entries into `row` (its position is the caller's to set)."""
        layers = len(self.k)
        steps = snapshot[0].shape[1]
        for k, part in zip(self.k, snapshot[:layers], strict=True):
            k[row, :, :steps].copy_(part, non_blocking=True)
        for v, part in zip(self.v, snapshot[layers:], strict=True):
            dst = v[row, :, :, :steps] if self.values_transposed else v[row, :, :steps]
            dst.copy_(part, non_blocking=True)


def ring_key_positions(last: torch.Tensor, capacity: int, length: int) -> torch.Tensor:
    """The absolute step held by ring entries `0..length-1` of each row, `[B, length]`,
    once step `last [B]` is written (entries fill in ring order; negative = never written).
    """
    j = torch.arange(length, device=last.device)
    last = last.view(-1, 1)
    return last - torch.remainder(last - j, capacity)


def ring_mask(qpos: torch.Tensor, kpos: torch.Tensor, context: int) -> torch.Tensor:
    """Which keys each query may see, `[B, 1, T, S]` (bool, broadcast over heads): queries
    at absolute steps `qpos [B, T]`, keys at `kpos [B, S]` (from `ring_key_positions`);
    a key is visible when it was written, is not in the future and is within `context`."""
    delta = qpos.unsqueeze(-1) - kpos.unsqueeze(1)  # (B, T, S)
    return ((kpos.unsqueeze(1) >= 0) & (delta >= 0) & (delta < context)).unsqueeze(1)
