"""Per-frame latency budget: deadlines, in-order output, backlog bounding, latency figures.

Pure bookkeeping with no I/O and no clock of its own (callers pass `now`), so the rules are
unit-tested directly with a fake clock:

- every complete input frame gets an index t and a deadline `complete_time + budget`;
- outputs leave strictly in frame order; frame t's output is whatever the backends produced,
  or silence when it was not ready by its deadline (a *miss*), when the LM was still in its
  initial acoustic delay (not a miss), or when the input frame was dropped;
- a frame is dropped, instead of being sent to the backends, when `max_backlog` frames are
  already outstanding there: memory stays bounded. A drop is an *overflow* (the client is
  ahead of real time; not a miss, and it does not reset the streak) unless the oldest frame
  outstanding at the backends is already past its deadline: then a stage is not answering,
  and the drop is *stalled*, a miss like a late frame;
- `max_consecutive_misses` misses in a row (late or stalled drops) mark the session as
  exceeded (0 = never);
- pre-recorded input (`chained=True`, a session with INPUT_PACING_FLOW_CONTROL): the
  gateway takes a frame while up to `--flow-window-frames` earlier frames of the same
  session are still at the backends, so it would queue behind its own session's frames, a
  wait the sender chose, not a slow backend. Its clock starts when it is taken or when the
  frame before it left, whichever is later: the budget then bounds each frame's own time
  through the pipeline, and a stalled stage still misses at the head frame's deadline;
- latency (what the summary's percentiles cover): a frame's latency runs from `complete` to
  the moment its output is written to the client (`written`). A late frame counts with its
  real latency when its output finally reaches the gateway (`resolve` after give-up), or at
  `finalize` (session end) with the time so far if it never came. Dropped frames never enter
  the percentiles; they are counted apart.

`StageWatch` is the other half of the miss rule: a backend stage with frames outstanding that
has not answered for `limit` seconds (K frames' time) is stalled, whether or not new input
keeps coming to be counted as misses.
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
    # When the input frame was complete (its clock's start), for `FrameSequencer.written`.
    complete: float
    # For LATE: how far past the deadline the frame was given up, ms. For LATE and stalled
    # drops: the streak length including this frame.
    late_ms: float = 0.0
    consecutive: int = 0
    # For DROPPED: True when dropped because a stage was not answering (a miss).
    stalled: bool = False


class _FrameState:
    """One frame from input to output: its clock, and the answer once it came."""

    __slots__ = ("index", "complete", "deadline", "cause", "pcm", "done", "stalled")

    def __init__(self, index: int, complete: float, deadline: float) -> None:
        self.index = index
        self.complete = complete
        self.deadline = deadline
        self.cause: Cause | None = None
        self.pcm: np.ndarray | None = None
        self.done = False
        self.stalled = False


# Windows up to this many samples get their percentiles from a plain sort.
_SMALL_WINDOW = 2048


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
        n = len(self._values)
        if not n:
            return tuple(0.0 for _ in qs)
        if n > _SMALL_WINDOW:
            arr = np.fromiter(self._values, dtype=np.float64, count=n)
            return tuple(float(v) * 1000.0 for v in np.percentile(arr, qs))
        # A session's summary: np.percentile's fixed cost is most of the work at this size.
        # Same method (linear interpolation between closest ranks).
        values = sorted(self._values)
        out = []
        for q in qs:
            pos = (n - 1) * q / 100.0
            lo = int(pos)
            hi = min(lo + 1, n - 1)
            out.append((values[lo] + (values[hi] - values[lo]) * (pos - lo)) * 1000.0)
        return tuple(out)


@dataclass(slots=True)
class Ticket:
    """What the caller must do with a newly completed input frame."""

    index: int
    send: bool  # False: dropped (backlog full), do not send it to the backends


class FrameSequencer:
    """Tracks every frame from input to output; see the module docstring for the rules."""

    def __init__(
        self,
        budget_s: float,
        max_consecutive_misses: int,
        max_backlog: int,
        *,
        chained: bool = False,
    ) -> None:
        if budget_s <= 0 or not math.isfinite(budget_s):
            raise ValueError(f"budget must be a positive number of seconds, got {budget_s}")
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
        self.budget_s = budget_s
        self.max_consecutive_misses = max_consecutive_misses
        self.max_backlog = max_backlog
        self.chained = chained
        self._frames: deque[_FrameState] = deque()  # head (next to emit) ... newest
        self._head = 0  # index of the next frame to emit
        self._next = 0  # index of the next input frame
        # Frames sent to the backends and not answered yet: index -> complete time, oldest
        # first (a dict keeps insertion order; answers may come out of order).
        self._sent: dict[int, float] = {}
        # Frames given up as LATE whose output has not come back yet: index -> complete.
        self._late_waiting: dict[int, float] = {}
        self.consecutive_misses = 0
        self.frames_in = 0
        self.frames_out = 0
        self.frames_late = 0
        self.frames_dropped = 0
        self.frames_dropped_stalled = 0
        self.frames_initial_delay = 0
        self.late_arrivals = 0  # backend answers that came after their frame was given up
        self.latency = LatencyWindow()

    @property
    def outstanding(self) -> int:
        """Frames sent to the backends and not yet answered (given-up ones included)."""
        return len(self._sent)

    # ----------------------------------------------------------------- input side

    def add_frame(self, now: float) -> Ticket:
        """A complete input frame at time `now`: assign its index, decide send or drop."""
        index = self._next
        self._next += 1
        self.frames_in += 1
        fs = _FrameState(index, now, now + self.budget_s)
        self._frames.append(fs)
        sent = self._sent
        if len(sent) >= self.max_backlog:
            fs.cause = Cause.DROPPED
            fs.done = True
            self.frames_dropped += 1
            # The oldest frame at the backends is past its deadline: they are not keeping
            # up (a stage is not answering), not the client running ahead.
            oldest = next(iter(sent.values()))
            if now >= oldest + self.budget_s:
                fs.stalled = True
                self.frames_dropped_stalled += 1
            return Ticket(index, send=False)
        sent[index] = now
        return Ticket(index, send=True)

    # ----------------------------------------------------------------- backend side

    def resolve(self, index: int, pcm: np.ndarray | None, now: float) -> float | None:
        """The backends answered frame `index` at `now`: 24 kHz PCM, or None for
        LM-not-ready. Returns the frame's latency (seconds) when it had already been given
        up as late (it is recorded now, with its real value), else None."""
        self._sent.pop(index, None)
        if index < self._head:
            self.late_arrivals += 1  # already sent as silence: record its real latency
            complete = self._late_waiting.pop(index, None)
            if complete is None:
                return None
            latency = now - complete
            self.latency.add(latency)
            return latency
        fs = self._frames[index - self._head]
        if fs.done:  # answered twice: a backend protocol bug; keep the first answer
            return None
        fs.done = True
        if pcm is None:
            fs.cause = Cause.INITIAL_DELAY
        else:
            fs.cause = Cause.AUDIO
            fs.pcm = pcm
        return None

    # ----------------------------------------------------------------- output side

    def poll(self, now: float) -> list[Emission]:
        """Frames that can leave now, in order: answered ones, and silence for missed ones."""
        out: list[Emission] = []
        frames = self._frames
        while frames:
            fs = frames[0]
            cause = fs.cause
            if fs.done and (cause is not Cause.AUDIO or now < fs.deadline):
                emission = Emission(fs.index, cause, fs.pcm, fs.complete)
                if cause is Cause.AUDIO:
                    self.consecutive_misses = 0
                elif cause is Cause.INITIAL_DELAY:
                    self.frames_initial_delay += 1
                elif fs.stalled:
                    self.consecutive_misses += 1
                    emission.stalled = True
                    emission.consecutive = self.consecutive_misses
            elif now >= fs.deadline:
                # Not answered in time, or answered but not sent in time: either way the
                # output would reach the client after its deadline, so it is a miss.
                self.consecutive_misses += 1
                self.frames_late += 1
                emission = Emission(
                    fs.index,
                    Cause.LATE,
                    None,
                    fs.complete,
                    late_ms=(now - fs.deadline) * 1000.0,
                    consecutive=self.consecutive_misses,
                )
                if fs.done:  # its output is here, just too late to send
                    self.latency.add(now - fs.complete)
                else:
                    self._late_waiting[fs.index] = fs.complete
            else:
                break
            frames.popleft()
            self._head += 1
            self.frames_out += 1
            out.append(emission)
            if self.exceeded:
                break  # the caller ends the session now; later frames do not matter
            if self.chained and frames and frames[0].complete < now:
                nxt = frames[0]  # its clock starts now: the frame before it just left
                nxt.complete, nxt.deadline = now, now + self.budget_s
                if nxt.index in self._sent:
                    self._sent[nxt.index] = now
        return out

    def written(self, emission: Emission, now: float) -> float | None:
        """An emitted frame's output was written to the client at `now`: record its latency
        (AUDIO and INITIAL_DELAY frames) and return it; None for late and dropped frames."""
        if emission.cause is Cause.AUDIO or emission.cause is Cause.INITIAL_DELAY:
            latency = now - emission.complete
            self.latency.add(latency)
            return latency
        return None

    def finalize(self, now: float) -> list[float]:
        """The session ends: late frames whose output never came count with their latency
        so far (a lower bound). Returns those latencies. Idempotent."""
        out = [now - complete for complete in self._late_waiting.values()]
        self._late_waiting.clear()
        for latency in out:
            self.latency.add(latency)
        return out

    def next_deadline(self) -> float | None:
        """When the head frame must be given up (None when nothing is waiting)."""
        if not self._frames:
            return None
        return self._frames[0].deadline

    @property
    def pending(self) -> int:
        """Frames received whose output has not left yet."""
        return len(self._frames)

    @property
    def exceeded(self) -> bool:
        k = self.max_consecutive_misses
        return k > 0 and self.consecutive_misses >= k


class StageWatch:
    """Is a backend stage still answering? One FIFO of send times per stage (streams answer
    in order). A stage with frames outstanding is stalled once `limit_s` passed since the
    later of its oldest outstanding send and its last answer (0 = never)."""

    def __init__(self, stages: tuple[str, ...], limit_s: float) -> None:
        self.limit_s = limit_s
        self._sent: dict[str, deque[float]] = {s: deque() for s in stages}
        self._answered: dict[str, float] = dict.fromkeys(stages, -math.inf)

    def sent(self, stage: str, now: float) -> None:
        self._sent[stage].append(now)

    def answered(self, stage: str, now: float) -> None:
        q = self._sent[stage]
        if q:
            q.popleft()
        self._answered[stage] = now

    def restart(self, stage: str, now: float, count: int) -> None:
        """The stage's stream was re-opened (failover) with `count` frames resent now."""
        self._sent[stage] = deque([now] * count)
        self._answered[stage] = now

    def silent_since(self, stage: str) -> float | None:
        """Since when the stage owes an answer (None: nothing outstanding)."""
        q = self._sent[stage]
        if not q:
            return None
        return max(q[0], self._answered[stage])

    def stalled(self, now: float, limit_s: float | None = None) -> str | None:
        """The first stage (in the order given) that has not answered for `limit_s`."""
        limit = self.limit_s if limit_s is None else limit_s
        if limit <= 0:
            return None
        for stage in self._sent:
            since = self.silent_since(stage)
            if since is not None and now - since >= limit:
                return stage
        return None

    def next_check(self, now: float, limit_s: float | None = None) -> float | None:
        """The earliest time a stage could become stalled (None: never, limit 0)."""
        limit = self.limit_s if limit_s is None else limit_s
        if limit <= 0:
            return None
        times = [s for s in map(self.silent_since, self._sent) if s is not None]
        return (min(times) if times else now) + limit
