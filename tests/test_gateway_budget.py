"""FrameSequencer: deadlines, in-order output, backlog drops, consecutive-miss limit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshi_grpc.services.gateway.budget import Cause, FrameSequencer, LatencyWindow, StageWatch
from moshi_grpc.services.gateway.config import GatewaySettings

FRAME_S = 0.08

PCM = np.ones(1920, np.float32)


def test_outputs_leave_in_frame_order_even_when_answers_do_not() -> None:
    seq = FrameSequencer(budget_s=0.2, max_consecutive_misses=3, max_backlog=8)
    for i in range(3):
        assert seq.add_frame(now=i * 0.08).send
    seq.resolve(2, PCM, now=0.17)
    seq.resolve(1, PCM, now=0.17)
    assert seq.poll(now=0.17) == []  # frame 0 still pending, within its budget
    seq.resolve(0, None, now=0.18)  # LM not ready yet: silence, not a miss
    out = seq.poll(now=0.18)
    assert [e.index for e in out] == [0, 1, 2]
    assert [e.cause for e in out] == [Cause.INITIAL_DELAY, Cause.AUDIO, Cause.AUDIO]
    assert out[0].pcm is None and out[1].pcm is PCM
    assert seq.frames_late == 0 and seq.frames_initial_delay == 1
    # Latency runs to the moment the output is written, not to the poll.
    assert seq.written(out[0], now=0.19) == pytest.approx(0.19)
    assert seq.written(out[2], now=0.19) == pytest.approx(0.19 - 0.16)


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
    seq.resolve(0, PCM, now=0.126)  # too late: sent as silence already
    seq.resolve(1, PCM, now=0.126)
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
    seq.resolve(0, PCM, now=0.01)
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
    seq.resolve(1, None, now=0.1)
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
    seq.resolve(0, PCM, now=0.01)  # one slot free again
    assert seq.add_frame(now=0.01).send
    seq.resolve(1, PCM, now=0.02)
    seq.resolve(4, PCM, now=0.02)
    out = seq.poll(now=0.02)
    assert [e.cause for e in out] == [
        Cause.AUDIO,
        Cause.AUDIO,
        Cause.DROPPED,
        Cause.DROPPED,
        Cause.AUDIO,
    ]
    assert not out[2].stalled  # the backends were on time: the client ran ahead (overflow)
    assert seq.written(out[2], now=0.03) is None  # a dropped frame has no latency
    assert seq.pending == 0 and seq.frames_dropped_stalled == 0


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


@pytest.mark.parametrize("n", [1, 2, 37, 2048, 2049, 5000])
def test_latency_window_percentiles_match_numpy_on_both_paths(n: int) -> None:
    # Short windows (a session's summary) sort in Python, long ones use numpy: same figures.
    values = np.random.default_rng(n).exponential(0.05, n)
    w = LatencyWindow(capacity=10_000)
    for v in values:
        w.add(float(v))
    qs = (0, 50, 95, 99, 100)
    want = np.percentile(values, qs) * 1000.0
    assert w.percentiles_ms(qs) == pytest.approx(want, rel=1e-12, abs=1e-9)


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
            seq.resolve(sent.pop(0), PCM, now)
        else:
            emitted += [e.index for e in seq.poll(now)]
        assert seq.outstanding <= backlog
    emitted += [e.index for e in seq.poll(now + 1.0)]
    assert emitted == list(range(seq.frames_in))
    assert seq.frames_out == seq.frames_in
    assert seq.frames_out >= seq.frames_late + seq.frames_dropped


# ------------------------------------------------------------------ misses at the defaults


def _default_sequencer() -> FrameSequencer:
    d = GatewaySettings()
    return FrameSequencer(
        d.default_budget_ms / 1000.0, d.default_max_consecutive_misses, d.max_backlog_frames
    )


def test_stalled_stage_ends_the_session_at_the_default_k_and_backlog() -> None:
    """A real-time client, backends that stop answering: the first `backlog` frames are
    late, every later one is dropped for backlog while the oldest is past its deadline
    (stalled), and both count toward the streak: K misses end the session."""
    seq = _default_sequencer()
    k = seq.max_consecutive_misses
    exceeded_at = None
    for i in range(200):
        now = i * FRAME_S
        seq.add_frame(now)
        for e in seq.poll(now):
            assert e.cause in (Cause.LATE, Cause.DROPPED)
            assert e.consecutive == e.index + 1
        if seq.exceeded:
            exceeded_at = i
            break
    assert exceeded_at is not None, "the K-miss rule never fired"
    assert seq.consecutive_misses == k
    assert seq.frames_late == seq.max_backlog
    assert seq.frames_dropped_stalled == seq.frames_dropped == k - seq.max_backlog
    assert exceeded_at == k - 1  # the K-th frame's emission, at its arrival


def test_fast_sender_keeps_its_session_overflow_is_not_a_miss() -> None:
    """2 s of audio written at once, backends that answer on time: the frames over the
    backlog are dropped as overflow, never counted as misses, and never end the session."""
    seq = _default_sequencer()
    tickets = [seq.add_frame(0.0) for _ in range(25)]
    assert sum(t.send for t in tickets) == seq.max_backlog
    for t in tickets:
        if t.send:
            seq.resolve(t.index, PCM, now=0.01)
    out = seq.poll(0.01)
    assert len(out) == 25 and not seq.exceeded
    assert seq.consecutive_misses == 0 and seq.frames_late == 0
    assert seq.frames_dropped == 25 - seq.max_backlog and seq.frames_dropped_stalled == 0
    assert not any(e.stalled for e in out)


def test_stalled_drops_count_toward_the_streak_overflow_drops_do_not_reset_it() -> None:
    seq = FrameSequencer(budget_s=0.1, max_consecutive_misses=5, max_backlog=1)
    seq.add_frame(0.0)  # sent, never answered
    assert not seq.add_frame(0.05).send  # oldest (0.0) within its budget: overflow
    assert not seq.add_frame(0.2).send  # oldest past its deadline: stalled
    out = seq.poll(0.2)
    assert [(e.cause, e.stalled, e.consecutive) for e in out] == [
        (Cause.LATE, False, 1),
        (Cause.DROPPED, False, 0),
        (Cause.DROPPED, True, 2),
    ]
    assert seq.frames_dropped == 2 and seq.frames_dropped_stalled == 1


# ------------------------------------------------------------------ honest accounting


def test_late_and_dropped_frames_never_flatter_the_percentiles() -> None:
    """The issue's case: 10 frames, 8 late and 2 dropped. The percentiles cover the late
    frames with their real latency (output arrival), or with the time until the session
    ended when it never came; the dropped frames are counted apart."""
    budget = 0.1
    seq = FrameSequencer(budget_s=budget, max_consecutive_misses=0, max_backlog=8)
    for i in range(10):
        seq.add_frame(i * FRAME_S)
    assert seq.frames_dropped == 2
    out = seq.poll(10.0)
    assert [e.cause for e in out] == [Cause.LATE] * 8 + [Cause.DROPPED] * 2
    assert len(seq.latency) == 0  # nothing known yet: no latency invented at give-up
    for i in range(6):  # six outputs finally arrive, 1 s after their input
        assert seq.resolve(i, PCM, now=i * FRAME_S + 1.0) == pytest.approx(1.0)
    assert seq.late_arrivals == 6
    lower_bounds = seq.finalize(now=20.0)  # the session ends; two never came
    assert lower_bounds == pytest.approx([20.0 - 6 * FRAME_S, 20.0 - 7 * FRAME_S])
    assert seq.finalize(now=30.0) == []  # idempotent
    assert len(seq.latency) == 8
    p50, _, p99 = seq.latency.percentiles_ms()
    assert p50 >= budget * 1000 and p99 > 10_000
    assert seq.frames_late == 8 and seq.frames_out == seq.frames_in == 10


def test_answer_in_but_sent_late_counts_with_its_latency_at_give_up() -> None:
    seq = FrameSequencer(budget_s=0.1, max_consecutive_misses=0, max_backlog=8)
    seq.add_frame(0.0)
    seq.resolve(0, PCM, now=0.05)
    (e,) = seq.poll(0.3)
    assert e.cause is Cause.LATE
    assert list(seq.latency._values) == [pytest.approx(0.3)]
    assert seq.written(e, now=0.31) is None  # silence: not counted twice


# ------------------------------------------------------------------ stage watch (fake clock)


def test_stage_watch_flags_the_silent_stage_after_its_limit() -> None:
    w = StageWatch(("encode", "step", "decode"), limit_s=2.0)
    assert w.stalled(100.0) is None and w.next_check(5.0) == pytest.approx(7.0)
    w.sent("encode", 0.0)
    w.sent("encode", 0.08)
    w.answered("encode", 0.01)
    w.sent("step", 0.01)
    # encode owes frame 1 since 0.08; the step owes since 0.01.
    assert w.next_check(0.5) == pytest.approx(2.01)
    assert w.stalled(2.0) is None
    assert w.stalled(2.02) == "step"
    w.answered("step", 2.0)
    assert w.stalled(2.05) is None  # answered at 2.0; nothing more owed there
    assert w.stalled(2.09) == "encode"  # frame 1 sent at 0.08, never answered
    # An answer resets the clock even with a queue behind it (slow, not stalled).
    w.answered("encode", 2.1)
    assert w.silent_since("encode") is None
    for t in (3.0, 3.08, 3.16):
        w.sent("decode", t)
    w.answered("decode", 4.0)
    assert w.silent_since("decode") == pytest.approx(4.0)
    assert w.stalled(5.9) is None and w.stalled(6.0) == "decode"
    w.restart("decode", 7.0, count=1)
    assert w.silent_since("decode") == pytest.approx(7.0)


def test_stage_watch_off_when_misses_never_end_the_session() -> None:
    w = StageWatch(("encode",), limit_s=0.0)
    w.sent("encode", 0.0)
    assert w.stalled(1e9) is None and w.next_check(0.0) is None


def _pipeline(chained: bool) -> FrameSequencer:
    """Three frames of pre-recorded input taken at once; the backends answer one per 0.15 s
    (each frame's own time through them), the budget is 0.2 s."""
    seq = FrameSequencer(budget_s=0.2, max_consecutive_misses=0, max_backlog=8, chained=chained)
    for _ in range(3):
        assert seq.add_frame(now=0.0).send
    return seq


def _answer_one_per_150ms(seq: FrameSequencer) -> list:
    out = []
    for i in range(3):
        now = 0.15 * (i + 1)
        out += seq.poll(now=now - 1e-9)  # whatever is due before the answer comes
        seq.resolve(i, PCM, now=now)
        out += seq.poll(now=now)
    return out


def test_flow_controlled_frames_do_not_wait_on_their_own_session_against_the_budget() -> None:
    """Pre-recorded input (chained clocks): a frame's clock starts when the frame before it
    left, so queueing behind its own session's frames is not a miss; live input taken at
    once would miss (its clock ran while it queued)."""
    chained = _answer_one_per_150ms(_pipeline(chained=True))
    assert [(e.index, e.cause) for e in chained] == [(i, Cause.AUDIO) for i in range(3)]
    assert [e.complete for e in chained] == pytest.approx([0.0, 0.15, 0.30])
    live = _answer_one_per_150ms(_pipeline(chained=False))
    assert [e.cause for e in live] == [Cause.AUDIO, Cause.LATE, Cause.LATE]


def test_flow_controlled_session_on_a_stalled_backend_still_misses() -> None:
    """Chained clocks do not hide a stage that stopped answering: the head frame misses at
    its deadline, the next one a budget later, until the streak ends the session."""
    seq = FrameSequencer(budget_s=0.25, max_consecutive_misses=3, max_backlog=8, chained=True)
    for _ in range(4):
        seq.add_frame(now=0.0)
    assert seq.next_deadline() == 0.25
    misses = []
    for now in (0.25, 0.5, 0.75):  # exact in binary: deadlines land on them
        misses += seq.poll(now=now)
        if not seq.exceeded:
            assert seq.next_deadline() == now + 0.25
    assert [(e.cause, e.consecutive) for e in misses] == [(Cause.LATE, k) for k in (1, 2, 3)]
    assert seq.exceeded
