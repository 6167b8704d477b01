"""A session's LM history for failover replay, in a compact bounded ring buffer.

Per answered LM step: the user codes sent and, when the step was ready, the text token and
Moshi codes received. One int32 row per step (72 bytes with 8+8 codebooks), grown on
demand up to `capacity` steps; older steps are forgotten. The default capacity is the LM's
context (3000 steps = 240 s): a replay longer than that could not change the model's state
any more than its last 3000 steps do, and it bounds both the gateway's memory and the replay
time on the new replica. (Once steps were forgotten, the new replica starts from the oldest
kept step as if it were the first of a conversation, so the continuation is close to, not
exactly, what the old replica would have produced; within the capacity it is exact.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moshi_grpc.v1 import lm_pb2


class LmHistory:
    """The last `capacity` LM steps of one session, oldest first."""

    def __init__(self, capacity: int, num_codebooks: int | None = None) -> None:
        """`num_codebooks`: Moshi codes per ready step (default: as many as user codes)."""
        if capacity < 1:
            raise ValueError(f"history capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._n_moshi = num_codebooks
        self._rows: np.ndarray | None = None
        self._n_user = 0
        self._start = 0  # index of the oldest row
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _row(self, width: int) -> np.ndarray:
        rows = self._rows
        if rows is None:
            rows = self._rows = np.empty((min(64, self.capacity), width), np.int32)
        elif self._len == rows.shape[0] and rows.shape[0] < self.capacity:
            grown = np.empty((min(2 * rows.shape[0], self.capacity), rows.shape[1]), np.int32)
            grown[: self._len] = np.roll(rows, -self._start, axis=0)
            rows = self._rows = grown
            self._start = 0
        if self._len < rows.shape[0]:
            i = (self._start + self._len) % rows.shape[0]
            self._len += 1
        else:  # full: overwrite the oldest
            i = self._start
            self._start = (self._start + 1) % rows.shape[0]
        return rows[i]

    def append(
        self, user_codes: Sequence[int], text_token: int | None, moshi_codes: Sequence[int]
    ) -> None:
        """Record one answered step (`text_token` None: not ready, no output yet)."""
        if self._rows is None:
            self._n_user = len(user_codes)
            width = self._n_user + 2 + (self._n_moshi or self._n_user)
        else:
            width = self._rows.shape[1]
        row = self._row(width)
        # Columns: user codes, ready (0/1), text token, Moshi codes. (One list: numpy converts
        # it faster than protobuf repeated fields read one by one.)
        if text_token is None:
            n = self._n_user
            row[:n] = list(user_codes)
            row[n:] = 0
        else:
            row[:] = [*user_codes, 1, text_token, *moshi_codes]

    def replay(self) -> list[lm_pb2.ReplayStep]:
        """The steps as `LmOpen.replay`, oldest first."""
        if self._rows is None:
            return []
        rows = np.roll(self._rows, -self._start, axis=0)[: self._len].tolist()
        n = self._n_user
        out = []
        for row in rows:
            if row[n]:
                out.append(
                    lm_pb2.ReplayStep(
                        user_codes=row[:n], text_token=row[n + 1], moshi_codes=row[n + 2 :]
                    )
                )
            else:
                out.append(lm_pb2.ReplayStep(user_codes=row[:n]))
        return out
