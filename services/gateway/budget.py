"""Per-frame latency budget: deadlines, in-order output, backlog bounding, latency figures.

Pure bookkeeping with no I/O and no clock of its own (callers pass `now`), so the rules are
unit-tested directly:

- every complete input frame gets an index t and a deadline `complete_time + budget`;
- outputs leave strictly in frame order; frame t's output is whatever the backends produced,
  or silence when it was not ready by its deadline (a *miss*), when the LM was still in its
  initial acoustic delay (not a miss), or when the input frame was dropped;
- a frame is dropped, instead of being sent to the backends, when `max_backlog` frames are
  already outstanding there (input faster than the backends keep up): memory stays bounded;
- `max_consecutive_misses` misses in a row mark the session as exceeded (0 = never).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum

import numpy as np


class Cause(str, Enum):
    """Why an output frame carries what it carries."""

    AUDIO = "audio"  # the backends' output, on time
    INITIAL_DELAY = "initial_delay"  # LM not ready yet: silence, not a miss
    LATE = "late"  # missed the deadline: silence, a miss
    DROPPED = "dropped"  # input frame dropped (backlog full): silence


@dataclass(slots=True)
class Emission:
    """One output frame, ready to be sent (silence when `pcm` is None)."""

    index: int
    cause: Cause
    pcm: np.ndarray | None
    # Input frame complete -> emission, seconds (None for dropped frames).
    latency_s: float | None
    # For LATE: how far past the deadline the frame was given up, ms, and the streak length.
    late_ms: float = 0.0
    consecutive: int = 0


class _Slot:
    __slots__ = ("index", "complete", "deadline", "cause", "pcm", "done")

    def __init__(self, index: int, complete: float, deadline: float) -> None:
        self.index = index
        self.complete = complete
        self.deadline = deadline
        self.cause: Cause | None = None
        self.pcm: np.ndarray | None = None
        self.done = False


class LatencyWindow:
    """Latency samples (seconds) for percentiles; a bounded window so memory stays flat."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._values: deque[float] = deque(maxlen=capacity)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def __len__(self) -> int:
        return len(self._values)

    def percentiles_ms(self, qs: tuple[float, ...] = (50, 95, 99)) -> tuple[float, ...]:
        """Percentiles in milliseconds; zeros when there is no sample."""
        if not self._values:
            return tuple(0.0 for _ in qs)
        arr = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        return tuple(float(v) * 1000.0 for v in np.percentile(arr, qs))


@dataclass(slots=True)
class Ticket:
    """What the caller must do with a newly completed input frame."""

    index: int
    send: bool  # False: dropped (backlog full), do not send it to the backends


class FrameSequencer:
    """Tracks every frame from input to output; see the module docstring for the rules."""

    def __init__(self, budget_s: float, max_consecutive_misses: int, max_backlog: int) -> None:
        if budget_s <= 0 or not math.isfinite(budget_s):
            raise ValueError(f"budget must be a positive number of seconds, got {budget_s}")
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
        self.budget_s = budget_s
        self.max_consecutive_misses = max_consecutive_misses
        self.max_backlog = max_backlog
        self._slots: deque[_Slot] = deque()  # head (next to emit) ... newest
        self._head = 0  # index of the next frame to emit
        self._next = 0  # index of the next input frame
        self.outstanding = 0  # frames sent to the backends and not yet answered
        self.consecutive_misses = 0
        self.frames_in = 0
        self.frames_out = 0
        self.frames_late = 0
        self.frames_dropped = 0
        self.frames_initial_delay = 0
        self.late_arrivals = 0  # backend answers that came after their frame was given up
        self.latency = LatencyWindow()

    # ----------------------------------------------------------------- input side

    def add_frame(self, now: float) -> Ticket:
        """A complete input frame at time `now`: assign its index, decide send or drop."""
        index = self._next
        self._next += 1
        self.frames_in += 1
        slot = _Slot(index, now, now + self.budget_s)
        self._slots.append(slot)
        if self.outstanding >= self.max_backlog:
            slot.cause = Cause.DROPPED
            slot.done = True
            self.frames_dropped += 1
            return Ticket(index, send=False)
        self.outstanding += 1
        return Ticket(index, send=True)

    # ----------------------------------------------------------------- backend side

    def resolve(self, index: int, pcm: np.ndarray | None) -> None:
        """The backends answered frame `index`: 24 kHz PCM, or None for LM-not-ready."""
        if self.outstanding > 0:
            self.outstanding -= 1
        if index < self._head:
            self.late_arrivals += 1  # already given up as a miss; nothing to do
            return
        slot = self._slots[index - self._head]
        if slot.done:  # answered twice: a backend protocol bug; keep the first answer
            return
        slot.done = True
        if pcm is None:
            slot.cause = Cause.INITIAL_DELAY
        else:
            slot.cause = Cause.AUDIO
            slot.pcm = pcm

    # ----------------------------------------------------------------- output side

    def poll(self, now: float) -> list[Emission]:
        """Frames that can leave now, in order: answered ones, and silence for missed ones."""
        out: list[Emission] = []
        slots = self._slots
        while slots:
            slot = slots[0]
            cause = slot.cause
            if slot.done and (cause is not Cause.AUDIO or now < slot.deadline):
                latency = None if cause is Cause.DROPPED else now - slot.complete
                if cause is Cause.AUDIO:
                    self.consecutive_misses = 0
                elif cause is Cause.INITIAL_DELAY:
                    self.frames_initial_delay += 1
                emission = Emission(slot.index, cause, slot.pcm, latency)
            elif now >= slot.deadline:
                # Not answered in time, or answered but not sent in time: either way the
                # output would reach the client after its deadline, so it is a miss.
                self.consecutive_misses += 1
                self.frames_late += 1
                emission = Emission(
                    slot.index,
                    Cause.LATE,
                    None,
                    now - slot.complete,
                    late_ms=(now - slot.deadline) * 1000.0,
                    consecutive=self.consecutive_misses,
                )
            else:
                break
            slots.popleft()
            self._head += 1
            self.frames_out += 1
            if emission.latency_s is not None:
                self.latency.add(emission.latency_s)
            out.append(emission)
            if self.exceeded:
                break  # the caller ends the session now; later frames do not matter
        return out

    def next_deadline(self) -> float | None:
        """When the head frame must be given up (None when nothing is waiting)."""
        if not self._slots:
            return None
        return self._slots[0].deadline

    @property
    def pending(self) -> int:
        """Frames received whose output has not left yet."""
        return len(self._slots)

    @property
    def exceeded(self) -> bool:
        k = self.max_consecutive_misses
        return k > 0 and self.consecutive_misses >= k

    def fail_pending(self) -> None:
        """Forget outstanding frames (session ending); they are not counted as outputs."""
        self._slots.clear()
        self.outstanding = 0
