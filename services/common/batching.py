"""Slot-based cross-session batching (the sequence-batching idea of Triton and Riva).

A replica has a fixed number of slots (`--max-sessions`). Every open stream holds one slot
for its lifetime; an extra stream is refused with RESOURCE_EXHAUSTED (never queued
silently). RPC handlers only enqueue one frame at a time (`SlotHandle.submit`) and await a
future. ONE runner thread per model replica loops:

1. wait for the first pending frame, then at most `max_wait_s` more for the other active
   slots (stragglers) — a frame never waits longer than that for company;
2. apply the joins (per-slot reset with the stream's open payload) and leaves collected
   since the last call, in order, then run ONE batched model call over the slots that have
   a frame: the runner packs them into the smallest bucket of its ladder (buckets.py) and
   says how many rows it stepped;
3. resolve every stream's future on the event loop (`loop.call_soon_threadsafe`).

The model therefore never runs on the event loop (grpc/grpc#19881), and fixed shapes per
bucket keep the model call CUDA-graph friendly. `warm_up` steps every bucket at load, before
the replica serves; `bucket_timings` reports those times and recent ones per bucket, and the
gateway's admission reads them. A warm-up timed while a neighbour loaded its model would
otherwise stay wrong for good (an idle replica runs no ticks, so nothing new is measured,
and admission may refuse every session on it): while every scheduler of the process is idle,
one of them re-times one bucket every `idle_probe_s` (about) and keeps the faster figure.

A slot is freed when its stream ends for any
reason: `release()` is idempotent and is called both from the handler's `finally` and from
`context.add_done_callback`, because `finally` blocks may not run after `stop(grace)`
(grpc/grpc#37239). Frames still queued for a released slot are dropped and results of an
in-flight call for it are discarded: they never reach another stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from moshi_grpc.services.common.errors import CapacityExhausted, Draining
from moshi_grpc.services.common.metrics import BatcherMetrics

log = logging.getLogger(__name__)

# A runner's result for a payload it has not finished (a long prefill it works on a chunk
# per tick): the scheduler keeps the payload for the next tick and resolves nothing yet.
DEFERRED = object()

# Defaults of a backend's batching, wherever it is configured from (flags, `up`, options).
DEFAULT_MAX_SESSIONS = 16  # slots
DEFAULT_IDLE_PROBE_S = 5.0  # re-time one bucket this often while idle (0: never)

# Idle probes time the model, so they must not overlap each other or a sibling's tick (the
# codec's encode and decode schedulers share the process's cores).
_PROBE_LOCK = threading.Lock()
_SCHEDULERS: weakref.WeakSet[BatchScheduler] = weakref.WeakSet()


class BatchRunner(Protocol):
    """What a service plugs into the scheduler. Its methods run on the runner thread only
    (`warm_up` before the thread starts)."""

    num_slots: int
    ladder: tuple[int, ...]  # the bucket sizes a tick may step (see buckets.py)

    def join(self, slot: int, open_payload: Any) -> None:
        """Reset `slot`'s model state for a new stream (called before its first frame)."""

    def leave(self, slot: int) -> None:
        """`slot`'s stream ended: free its state (called once per join, after it)."""

    def run(self, slots: Sequence[int], payloads: Sequence[Any]) -> tuple[Sequence[Any], int]:
        """One batched model call: `payloads[i]` is the frame of `slots[i]`; slots not listed
        are inactive this tick. Returns one result per listed slot, in the same order, and
        the number of rows the call stepped (its bucket). A result may be `DEFERRED`: the
        payload is not done (its work goes on over the next ticks)."""

    def warm_up(self, bucket: int) -> float:
        """Run one step at `bucket` on free rows (at load, before any stream joins; on CUDA
        this also captures the bucket's graph); the seconds of the step alone (resets and
        capture excluded, the device synchronised)."""


@dataclass(frozen=True)
class Timing:
    """Where one frame's time went on the server."""

    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(eq=False)
class _Item:
    slot: int
    payload: Any
    future: asyncio.Future
    arrived: float
    handle: SlotHandle | None = None


class SlotHandle:
    """One stream's slot. `submit` from the event loop; `release` is idempotent."""

    def __init__(self, scheduler: BatchScheduler, slot: int, session_id: str) -> None:
        self._scheduler = scheduler
        self.slot = slot
        self.session_id = session_id
        self.released = False

    async def submit(self, payload: Any) -> tuple[Any, Timing]:
        """Queue one frame for the next batched call and wait for its result."""
        return await self.submit_nowait(payload)

    def submit_nowait(self, payload: Any) -> asyncio.Future:
        """Queue one frame; the future resolves to `(result, Timing)` on the event loop.

        For callers that serve many slots from one task (the multiplexed streams): a done
        callback on the future costs no task wake-up per frame. It is cancelled when the slot
        is released (or the scheduler closes) before the frame's result is delivered."""
        return self._scheduler._submit(self, payload)

    def release(self) -> None:
        self._scheduler._release(self)


class BatchScheduler:
    """Fixed slots, one runner thread, one batched model call per tick."""

    def __init__(
        self,
        runner: BatchRunner,
        *,
        name: str,
        max_wait_s: float = 0.005,
        metrics: BatcherMetrics | None = None,
        inject_delay_s: float = 0.0,
        recent: int = 512,
        idle_probe_s: float = DEFAULT_IDLE_PROBE_S,
    ) -> None:
        if runner.num_slots < 1:
            raise ValueError(f"{name}: need at least one slot, got {runner.num_slots}")
        if max_wait_s < 0:
            raise ValueError(f"{name}: max wait must be >= 0, got {max_wait_s}")
        if idle_probe_s < 0:
            raise ValueError(f"{name}: idle probe interval must be >= 0, got {idle_probe_s}")
        self.runner = runner
        self.name = name
        self.num_slots = runner.num_slots
        self.max_wait_s = max_wait_s
        self.inject_delay_s = inject_delay_s
        self.metrics = metrics
        self._cond = threading.Condition()
        self._owners: list[SlotHandle | None] = [None] * self.num_slots
        self._pending: dict[int, _Item] = {}
        # joins and leaves not applied yet, in order: ("join", slot, payload) / ("leave", slot)
        self._events: list[tuple[Any, ...]] = []
        self._closed = False
        self._held = False  # `hold()`: no tick until `release_hold()`
        self._in_use = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._recent: deque[float] = deque(maxlen=recent)
        self._recent_by_bucket: dict[int, deque[float]] = {}
        self._recent_len = recent
        # bucket -> fastest step seen while idle (ms): at load, then by idle probes
        self.warm_ms: dict[int, float] = {}
        self._idle_probe_s = idle_probe_s
        self.idle_probes = 0  # probes run (tests and logs read it)
        self._next_probe = float("inf")  # set by start()
        self._probe_at = 0  # index into the ladder of the next bucket to probe
        self._ticking = False  # a tick is running (sibling schedulers read it, unlocked)
        self.calls = 0
        self.rows_stepped = 0  # rows passed to the model, all ticks (compute follows load)
        self.rows_log: deque[int] = deque(maxlen=recent)  # bucket of each recent tick
        self.busy_s = 0.0  # total wall time spent in model calls (benchmarks read it)
        if metrics is not None:
            metrics.slots.set(self.num_slots)
            metrics.slots_in_use.set(0)

    # -- lifecycle -----------------------------------------------------------------------

    def warm_up(self, repeats: int = 3) -> dict[int, float]:
        """Step every bucket of the ladder `repeats` times before serving; fastest ms each.

        Called once at load, before `start()` and before any stream joins: the first calls
        at a new shape pay for allocator growth, oneDNN/cuBLAS plans and (on CUDA) graph
        capture, which must not land on a live session's frame. The fastest time is the
        step's own cost (a busy moment only adds to it); admission reads it
        (`bucket_timings`) until ticks report recent times.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: warm up before start()")
        for bucket in self.runner.ladder:
            self.runner.warm_up(bucket)  # the first call: plans, allocations, capture
            times = [self.runner.warm_up(bucket) for _ in range(max(1, repeats))]
            self.warm_ms[bucket] = min(times) * 1000.0
        log.info(
            "%s warmed up: %s",
            self.name,
            ", ".join(f"B{b} {ms:.1f} ms" for b, ms in self.warm_ms.items()),
        )
        return dict(self.warm_ms)

    def bucket_timings(self) -> list[tuple[int, float, float, int]]:
        """(bucket, warm ms, recent median ms or 0, recent count) per bucket. A bucket's warm
        figure is never above a larger bucket's: a tick could always step the larger one."""
        out = []
        ceiling = float("inf")
        warm = {}
        for bucket in sorted(self.runner.ladder, reverse=True):
            ms = self.warm_ms.get(bucket, 0.0)
            if ms > 0:
                ceiling = min(ceiling, ms)
                warm[bucket] = ceiling
        for bucket in self.runner.ladder:
            recent = sorted(self._recent_by_bucket.get(bucket, ()))
            p50 = recent[len(recent) // 2] * 1000.0 if recent else 0.0
            out.append((bucket, warm.get(bucket, 0.0), p50, len(recent)))
        return out

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the runner thread; results are delivered on `loop` (default: running loop)."""
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._schedule_probe()
        _SCHEDULERS.add(self)
        self._thread = threading.Thread(target=self._run_forever, name=f"{self.name}-runner")
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        """Stop the runner thread; every queued frame's future is cancelled."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            _SCHEDULERS.discard(self)
            items = list(self._pending.values())
            self._pending.clear()
            self._cond.notify_all()
        self._cancel(items)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def hold(self) -> None:
        """Run no tick until `release_hold()`: frames queue meanwhile, so a test decides
        which frames share a tick instead of leaving it to their arrival times."""
        with self._cond:
            self._held = True

    def release_hold(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify()

    # -- introspection -------------------------------------------------------------------

    @property
    def frames_queued(self) -> int:
        """Frames submitted and not taken by a tick yet."""
        with self._cond:
            return len(self._pending)

    @property
    def slots_in_use(self) -> int:
        with self._cond:
            return self._in_use

    @property
    def serving(self) -> bool:
        """A stream holds a slot or a tick is running (read unlocked by siblings' probes)."""
        return not self._closed and (self._in_use > 0 or self._ticking)

    def step_percentiles_ms(self) -> tuple[float, float]:
        """p50 and p99 of recent batched call times, in ms (0, 0 before the first call)."""
        values = sorted(self._recent)
        if not values:
            return 0.0, 0.0

        def pct(q: float) -> float:
            return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] * 1000.0

        return pct(0.5), pct(0.99)

    # -- event-loop side -----------------------------------------------------------------

    def acquire(self, open_payload: Any = None, session_id: str = "") -> SlotHandle:
        """Take a free slot (its state is reset before its first frame) or refuse."""
        with self._cond:
            if self._closed:
                if self.metrics is not None:
                    self.metrics.refused("draining").inc()
                raise Draining(f"{self.name} is shutting down; retry on another replica")
            for slot, owner in enumerate(self._owners):
                if owner is None:
                    handle = SlotHandle(self, slot, session_id)
                    self._owners[slot] = handle
                    self._events.append(("join", slot, open_payload))
                    self._in_use += 1
                    in_use = self._in_use
                    break
            else:
                if self.metrics is not None:
                    self.metrics.refused("capacity").inc()
                raise CapacityExhausted(
                    f"all {self.num_slots} {self.name} slots are in use; "
                    "retry later (with backoff) or on another replica"
                )
        if self.metrics is not None:
            self.metrics.streams_started.inc()
            self.metrics.slots_in_use.set(in_use)
        log.debug("%s: slot %d -> session %s", self.name, slot, session_id or "-")
        return handle

    def _submit(self, handle: SlotHandle, payload: Any) -> asyncio.Future:
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{self.name}: scheduler not started")
        future = loop.create_future()
        with self._cond:
            if self._closed:
                raise Draining(f"{self.name} is shutting down")
            if handle.released or self._owners[handle.slot] is not handle:
                raise RuntimeError(f"{self.name}: slot {handle.slot} was released")
            if handle.slot in self._pending:
                raise RuntimeError(f"{self.name}: slot {handle.slot} already has a queued frame")
            self._pending[handle.slot] = _Item(
                handle.slot, payload, future, time.perf_counter(), handle
            )
            # Wake the runner only when it has something to decide (the first frame starts
            # the max-wait clock; the last one completes the batch): every wake-up costs a
            # GIL hand-off between the event loop and the runner thread.
            waiting = len(self._pending)
            if waiting == 1 or waiting >= self._in_use:
                self._cond.notify()
        return future

    def _release(self, handle: SlotHandle) -> None:
        with self._cond:
            if handle.released:
                return
            handle.released = True
            item = None
            if self._owners[handle.slot] is handle:
                self._owners[handle.slot] = None
                self._events.append(("leave", handle.slot))
                item = self._pending.pop(handle.slot, None)
                self._in_use -= 1
            in_use = self._in_use
            self._cond.notify()
        if item is not None:
            self._cancel([item])
        if self.metrics is not None:
            self.metrics.slots_in_use.set(in_use)
        log.debug("%s: slot %d released", self.name, handle.slot)

    def _cancel(self, items: list[_Item]) -> None:
        loop = self._loop
        if not items or loop is None or loop.is_closed():
            return

        def cancel() -> None:
            for it in items:
                if not it.future.done():
                    it.future.cancel()

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is loop:
                cancel()
            else:
                loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # loop closed meanwhile
            pass

    # -- runner thread -------------------------------------------------------------------

    def _gather(self) -> tuple[list[_Item], list[tuple[Any, ...]]] | None:
        """Block until a batch is due; None once closed. Leaves are applied as soon as
        they happen (a freed row is compacted away before the next tick)."""
        with self._cond:
            while True:
                while not self._closed and (self._held or not self._pending):
                    if self._events:
                        events, self._events = self._events, []
                        self._cond.release()
                        try:
                            self._apply(events)
                        finally:
                            self._cond.acquire()
                        continue
                    if self._held or self._in_use:
                        self._cond.wait()
                        self._schedule_probe()  # probes only after idle_probe_s of quiet
                        continue
                    wait = self._next_probe - time.perf_counter()
                    if wait > 0:
                        self._cond.wait(None if wait == float("inf") else wait)
                        continue
                    self._cond.release()
                    try:
                        self._idle_probe()
                    finally:
                        self._cond.acquire()
                if self._closed:
                    return None
                deadline = min(it.arrived for it in self._pending.values()) + self.max_wait_s
                while not self._closed and self._pending:
                    if len(self._pending) >= self._in_use:
                        break
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closed:
                    return None
                if self._pending:  # (empty when the waiting streams all left meanwhile)
                    break
            items = sorted(self._pending.values(), key=lambda it: it.slot)
            self._pending.clear()
            events, self._events = self._events, []
            return items, events

    def _apply(self, events: list[tuple[Any, ...]]) -> None:
        """Joins and leaves, in the order they happened (a slot may leave and be taken again
        between two ticks). A failing join or leave is logged; the stream's frames then fail
        in `run` with a clear error."""
        for event in events:
            try:
                if event[0] == "join":
                    self.runner.join(event[1], event[2])
                else:
                    self.runner.leave(event[1])
            except Exception:  # noqa: BLE001 - the runner thread must survive
                log.exception("%s: %s of slot %d failed", self.name, event[0], event[1])

    def _run_forever(self) -> None:
        while True:
            gathered = self._gather()
            if gathered is None:
                return
            items, events = gathered
            try:
                self._run_once(items, events)
            except Exception:  # noqa: BLE001 - the runner thread must survive
                log.exception("%s: scheduler tick failed", self.name)

    @property
    def idle_probe_s(self) -> float:
        """Seconds between idle probes (0: none)."""
        return self._idle_probe_s

    @idle_probe_s.setter
    def idle_probe_s(self, seconds: float) -> None:
        """A new interval, counted from now (0 stops the probes)."""
        if seconds < 0:
            raise ValueError(f"{self.name}: idle probe interval must be >= 0, got {seconds}")
        with self._cond:
            self._idle_probe_s = seconds
            self._schedule_probe()
            self._cond.notify()

    def _schedule_probe(self) -> None:
        # jittered, so that the probes of replicas started together drift apart
        every = self._idle_probe_s
        self._next_probe = (
            time.perf_counter() + every * random.uniform(0.8, 1.2) if every else float("inf")
        )

    def _idle_probe(self) -> None:
        """Re-time one bucket of the ladder (in turn) on free rows, keep the faster figure.
        Runs on the runner thread with no stream joined; skipped while a sibling scheduler
        of this process serves or probes. A join arriving meanwhile waits one step."""
        self._schedule_probe()
        if any(s.serving for s in list(_SCHEDULERS) if s is not self):
            return
        if not _PROBE_LOCK.acquire(blocking=False):
            return
        try:
            ladder = self.runner.ladder
            bucket = ladder[self._probe_at % len(ladder)]
            self._probe_at += 1
            ms = self.runner.warm_up(bucket) * 1000.0
            self.idle_probes += 1
            before = self.warm_ms.get(bucket)
            if before is None or ms < before:
                self.warm_ms[bucket] = ms
                if before is not None and ms < 0.8 * before:
                    log.info(
                        "%s: B%d re-timed idle: %.1f ms (was %.1f)", self.name, bucket, ms, before
                    )
        except Exception:  # noqa: BLE001 - the runner thread must survive
            log.exception("%s: idle probe failed; idle probes off", self.name)
            self._next_probe = float("inf")
        finally:
            _PROBE_LOCK.release()

    def _run_once(self, items: list[_Item], events: list[tuple[Any, ...]]) -> None:
        self._ticking = True
        try:
            self._tick(items, events)
        finally:
            self._ticking = False

    def _tick(self, items: list[_Item], events: list[tuple[Any, ...]]) -> None:
        self._apply(events)
        start = time.perf_counter()
        results: Sequence[Any] | None = None
        error: BaseException | None = None
        bucket = 0
        try:
            if self.inject_delay_s > 0:
                time.sleep(self.inject_delay_s)
            results, bucket = self.runner.run(
                [it.slot for it in items], [it.payload for it in items]
            )
            if len(results) != len(items):
                raise RuntimeError(
                    f"{self.name}: model returned {len(results)} results for {len(items)} frames"
                )
        except Exception as exc:  # noqa: BLE001 - delivered to every waiting stream
            log.exception("%s: batched model call failed", self.name)
            error = exc
        end = time.perf_counter()
        compute = end - start
        n = len(items)
        self.calls += 1
        self.busy_s += compute
        self._recent.append(compute)
        if bucket:
            self.rows_stepped += bucket
            self.rows_log.append(bucket)
            recent = self._recent_by_bucket.get(bucket)
            if recent is None:
                recent = self._recent_by_bucket[bucket] = deque(maxlen=self._recent_len)
            recent.append(compute)
        deliveries = []
        deferred = []
        for i, it in enumerate(items):
            result = None if results is None else results[i]
            if result is DEFERRED and error is None:
                deferred.append(it)
                continue
            timing = Timing(queue_s=start - it.arrived, compute_s=compute, batch_size=n)
            deliveries.append((it.future, result, timing))
        if deferred:
            gone = []
            with self._cond:
                for it in deferred:  # kept for the next tick while its stream holds the slot
                    if self._owners[it.slot] is it.handle and it.slot not in self._pending:
                        self._pending[it.slot] = it
                    else:
                        gone.append(it)
            self._cancel(gone)
        m = self.metrics
        if m is not None:
            m.batch_size.observe(n)
            if bucket:
                m.bucket_rows.observe(bucket)
            m.compute_seconds.observe(compute)
            m.frames.inc(len(deliveries))
            for it in items:
                m.queue_wait_seconds.observe(start - it.arrived)
                if it not in deferred:
                    m.frame_seconds.observe(end - it.arrived)
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def deliver() -> None:
            for future, result, timing in deliveries:
                if future.done():  # cancelled: the stream left meanwhile
                    continue
                if error is not None:
                    future.set_exception(_copy_error(error))
                else:
                    future.set_result((result, timing))

        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # loop closed during shutdown
            pass


def _copy_error(error: BaseException) -> BaseException:
    """Each stream gets its own exception object (tracebacks are per raise)."""
    try:
        return type(error)(*error.args)
    except Exception:  # noqa: BLE001
        return RuntimeError(str(error))
