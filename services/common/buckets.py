"""Compute that follows load: live sessions packed into a prefix of rows, stepped in buckets.

A replica preallocates state for `--max-sessions` slots (its capacity). A tick steps only the
rows `[0, B)` of that state, where B is the smallest bucket of a fixed ladder (1, 2, 4, 8, ...,
capped at the slot count) that holds every row with a frame. For that to stay small, the live
sessions are kept packed into rows `[0, live)`: a session joins at row `live`; when one
leaves, the session in the last live row moves into the freed row (one copy of one session's
state, per leave, never per tick). The step is then a plain slice of every state tensor, so
it reads and writes no other session's memory, copies no cache, and keeps fixed shapes per
bucket (what CUDA graphs need: vLLM captures a ladder of batch sizes the same way).

Rows in `[live, B)` are free: they may be stepped with any input (their state is garbage
until a session joins and resets them). Live rows without a frame this tick are *masked*:
their state must not advance (the models' exec masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def bucket_ladder(max_sessions: int) -> tuple[int, ...]:
    """Powers of two below `max_sessions`, then `max_sessions` itself: 10 -> (1, 2, 4, 8, 10)."""
    if max_sessions < 1:
        raise ValueError(f"need at least one slot, got {max_sessions}")
    ladder = []
    b = 1
    while b < max_sessions:
        ladder.append(b)
        b *= 2
    ladder.append(max_sessions)
    return tuple(ladder)


def bucket_for(rows: int, ladder: Sequence[int]) -> int:
    """The smallest bucket holding `rows` rows."""
    for b in ladder:
        if b >= rows:
            return b
    raise ValueError(f"{rows} rows exceed the largest bucket {ladder[-1]}")


@dataclass(frozen=True)
class Move:
    """Copy every state tensor's row `src` into row `dst` (a leave's compaction)."""

    src: int
    dst: int


class RowTable:
    """Which slot lives in which row; keeps the live rows a prefix `[0, live)`.

    Slots are what streams hold (stable for a stream's life); rows are where their state
    lies (may change when another session leaves). Only the runner thread touches it.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.ladder = bucket_ladder(num_slots)
        self._row_of: list[int | None] = [None] * num_slots
        self._slot_at: list[int | None] = [None] * num_slots
        self.live = 0

    def join(self, slot: int) -> int:
        """Give `slot` the first free row (its state must then be reset)."""
        if self._row_of[slot] is not None:
            raise RuntimeError(f"slot {slot} already holds row {self._row_of[slot]}")
        row = self.live
        self._row_of[slot] = row
        self._slot_at[row] = slot
        self.live += 1
        return row

    def leave(self, slot: int) -> Move | None:
        """Free `slot`'s row; the last live row moves into it (the Move to apply), if any."""
        row = self._row_of[slot]
        if row is None:
            return None  # never joined (left before its first tick)
        self._row_of[slot] = None
        last = self.live - 1
        self.live = last
        self._slot_at[row] = None
        if row == last:
            return None
        moved = self._slot_at[last]
        assert moved is not None  # the prefix invariant: rows [0, live) are all held
        self._slot_at[last] = None
        self._slot_at[row] = moved
        self._row_of[moved] = row
        return Move(src=last, dst=row)

    def find_row(self, slot: int) -> int | None:
        """`slot`'s row, or None when it holds none (not joined, or left)."""
        return self._row_of[slot]

    def row_of(self, slot: int) -> int:
        row = self._row_of[slot]
        if row is None:
            raise RuntimeError(f"slot {slot} holds no row (not joined)")
        return row

    def plan(self, slots: Sequence[int]) -> TickPlan:
        """Rows and bucket of a tick stepping `slots`."""
        rows = [self.row_of(s) for s in slots]
        bucket = bucket_for(max(rows) + 1, self.ladder)
        stepped = set(rows)
        idle = [r for r in range(min(bucket, self.live)) if r not in stepped]
        return TickPlan(rows=rows, bucket=bucket, masked=bool(idle))


@dataclass(frozen=True)
class TickPlan:
    """One tick: `rows[i]` is the row of the i-th stepped slot; rows `[0, bucket)` run.

    `masked`: some live row in `[0, bucket)` has no frame, so the step needs its exec mask
    (otherwise every row of the bucket may advance: live ones have a frame, the rest are free).
    """

    rows: list[int]
    bucket: int
    masked: bool
