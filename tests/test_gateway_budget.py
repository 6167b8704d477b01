"""FrameSequencer: deadlines, in-order output, backlog drops, consecutive-miss limit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshi_grpc.services.gateway.budget import Cause, FrameSequencer, LatencyWindow

PCM = np.ones(1920, np.float32)


def test_outputs_leave_in_frame_order_even_when_answers_do_not() -> None:
    seq = FrameSequencer(budget_s=0.2, max_consecutive_misses=3, max_backlog=8)
    for i in range(3):
        assert seq.add_frame(now=i * 0.08).send
    seq.resolve(2, PCM)
    seq.resolve(1, PCM)
    assert seq.poll(now=0.17) == []  # frame 0 still pending, within its budget
    seq.resolve(0, None)  # LM not ready yet: silence, not a miss
    out = seq.poll(now=0.18)
    assert [e.index for e in out] == [0, 1, 2]
    assert [e.cause for e in out] == [Cause.INITIAL_DELAY, Cause.AUDIO, Cause.AUDIO]
    assert out[0].pcm is None and out[1].pcm is PCM
    assert seq.frames_late == 0 and seq.frames_initial_delay == 1
    assert out[0].latency_s == pytest.approx(0.18)


def test_missed_deadline_gives_silence_and_late_answers_are_discarded() -> None:
    seq = FrameSequencer(budget_s=0.1, max_consecutive_misses=0, max_backlog=8)
    seq.add_frame(now=0.0)
    seq.add_frame(now=0.08)
    assert seq.next_deadline() == pytest.approx(0.1)
    out = seq.poll(now=0.125)
    assert len(out) == 1
    miss = out[0]
    assert miss.cause is Cause.LATE and miss.pcm is None
    assert miss.late_ms == pytest.approx(25.0)
    assert miss.consecutive == 1
    seq.resolve(0, PCM)  # too late: dropped on the floor
    seq.resolve(1, PCM)
    out = seq.poll(now=0.13)
    assert [(e.index, e.cause) for e in out] == [(1, Cause.AUDIO)]
    assert seq.late_arrivals == 1
    assert seq.consecutive_misses == 0  # reset by a frame on time
    assert seq.frames_in == seq.frames_out == 2
    assert seq.outstanding == 0


def test_an_answer_sent_after_its_deadline_is_a_miss() -> None:
    """An answer that is in but only leaves after the deadline would arrive late too."""
    seq = FrameSequencer(budget_s=0.1, max_consecutive_misses=0, max_backlog=8)
    seq.add_frame(now=0.0)
    seq.resolve(0, PCM)
    (e,) = seq.poll(now=0.15)
    assert e.cause is Cause.LATE and e.pcm is None and e.late_ms == pytest.approx(50.0)
    assert seq.frames_late == 1


def test_consecutive_misses_exceed_the_limit() -> None:
    seq = FrameSequencer(budget_s=0.05, max_consecutive_misses=3, max_backlog=16)
    for i in range(6):
        seq.add_frame(now=i * 0.08)
    out = seq.poll(now=10.0)
    # It stops emitting at the third miss: the session ends there.
    assert [e.consecutive for e in out] == [1, 2, 3]
    assert seq.exceeded


def test_initial_delay_neither_counts_as_miss_nor_resets_streak() -> None:
    seq = FrameSequencer(budget_s=0.05, max_consecutive_misses=2, max_backlog=16)
    for i in range(3):
        seq.add_frame(now=i * 0.08)
    assert [e.cause for e in seq.poll(now=0.06)] == [Cause.LATE]
    seq.resolve(1, None)
    assert [e.cause for e in seq.poll(now=0.14)] == [Cause.INITIAL_DELAY]
    assert seq.consecutive_misses == 1 and not seq.exceeded
    assert [e.consecutive for e in seq.poll(now=0.22)] == [2]
    assert seq.exceeded
    assert seq.frames_late == 2 and seq.frames_initial_delay == 1


def test_backlog_full_drops_frames_which_become_silence() -> None:
    seq = FrameSequencer(budget_s=1.0, max_consecutive_misses=0, max_backlog=2)
    tickets = [seq.add_frame(now=0.0) for _ in range(4)]
    assert [t.send for t in tickets] == [True, True, False, False]
    assert seq.frames_dropped == 2 and seq.outstanding == 2
    seq.resolve(0, PCM)  # one slot free again
    assert seq.add_frame(now=0.01).send
    seq.resolve(1, PCM)
    seq.resolve(4, PCM)
    out = seq.poll(now=0.02)
    assert [e.cause for e in out] == [
        Cause.AUDIO,
        Cause.AUDIO,
        Cause.DROPPED,
        Cause.DROPPED,
        Cause.AUDIO,
    ]
    assert out[2].latency_s is None
    assert seq.pending == 0


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="budget"):
        FrameSequencer(budget_s=0.0, max_consecutive_misses=1, max_backlog=1)
    with pytest.raises(ValueError, match="backlog"):
        FrameSequencer(budget_s=0.1, max_consecutive_misses=1, max_backlog=0)


def test_latency_window_percentiles() -> None:
    w = LatencyWindow(capacity=1000)
    assert w.percentiles_ms() == (0.0, 0.0, 0.0)
    for i in range(1, 101):
        w.add(i / 1000.0)
    p50, p95, p99 = w.percentiles_ms()
    assert p50 == pytest.approx(50.5)
    assert p95 == pytest.approx(95.05)
    assert p99 == pytest.approx(99.01)
    for _ in range(5000):
        w.add(1.0)
    assert len(w) == 1000  # bounded


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["in", "answer", "poll"]), st.floats(0.0, 0.05)),
        min_size=1,
        max_size=80,
    ),
    st.integers(1, 6),
)
def test_every_input_frame_is_accounted_for(ops, backlog) -> None:
    """Whatever the interleaving, outputs are in order, once each, and counts add up."""
    seq = FrameSequencer(budget_s=0.1, max_consecutive_misses=0, max_backlog=backlog)
    now = 0.0
    sent: list[int] = []
    emitted: list[int] = []
    for op, dt in ops:
        now += dt
        if op == "in":
            t = seq.add_frame(now)
            if t.send:
                sent.append(t.index)
        elif op == "answer" and sent:
            seq.resolve(sent.pop(0), PCM)
        else:
            emitted += [e.index for e in seq.poll(now)]
        assert seq.outstanding <= backlog
    emitted += [e.index for e in seq.poll(now + 1.0)]
    assert emitted == list(range(seq.frames_in))
    assert seq.frames_out == seq.frames_in
    assert seq.frames_out >= seq.frames_late + seq.frames_dropped
