"""The budget contract at the default settings, on real loopback servers (echo backends).

- A backend stage that stops answering (its model runner frozen in place: the server, its
  health checks and its Info keep answering, as in a stuck GPU kernel) ends the session with
  DEADLINE_EXCEEDED at the default K (25) and backlog (8), for the codec and for the LM.
- A client that writes its audio faster than real time keeps its session (overflow drops).
- INPUT_PACING_FLOW_CONTROL streams a file at processing speed with no drop.
- Admission: a fresh replica refuses a 1 ms budget, with a `retry-after-ms` hint.

No test here depends on timing: stalls are explicit (a frozen runner, armed when the client
has seen a given frame), every outcome asserted is the same however fast the machine is.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from test_gateway import _MODE, FLOAT32, audio_msgs, config_msg, converse, start_stack

from moshi_grpc import audio
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.v1 import gateway_pb2


@pytest.fixture(autouse=True, params=["mux", "per-session"])
def backend_streams(request):
    """Every test here runs with both backend stream modes (gateway/streams.py)."""
    _MODE["backend_streams"] = request.param
    yield request.param
    _MODE["backend_streams"] = "mux"


class Freezer:
    """Freezes a batch scheduler's model runner on its next call once armed (the stage then
    stops answering, everything else keeps running); `release()` lets it go."""

    def __init__(self, scheduler) -> None:
        self.armed = threading.Event()
        self.gate = threading.Event()
        runner = scheduler.runner
        real_run = runner.run

        def run(*args, **kwargs):
            if self.armed.is_set():
                self.gate.wait(60)
            return real_run(*args, **kwargs)

        runner.run = run

    def release(self) -> None:
        self.gate.set()


def _dropped(stack, reason: str) -> float:
    """moshi_gateway_frames_dropped_total{reason} of the stack's gateway (0 when unset)."""
    value = stack.gateway.registry.get_sample_value(
        "moshi_gateway_frames_dropped_total", {"reason": reason}
    )
    return value or 0.0


def _count(stack, name: str) -> float:
    return stack.gateway.registry.get_sample_value(f"moshi_gateway_{name}_total") or 0.0


async def _converse_until_server_ends(
    stub, config, frames: int, *, on_audio=None, gate: asyncio.Event | None = None
) -> dict:
    """Send `frames` frames (paced 20 ms, not real time; from frame 4 on only once `gate`
    is set), then keep the stream open until the server ends it; collect events, audio
    frames and the status."""
    x = audio.speech_like(frames * 0.08, 24000, seed=3)
    requests = audio_msgs(x, FLOAT32, [1920])
    done = asyncio.Event()
    out = {"events": [], "audio": [], "kinds": []}

    async def gen():
        yield config
        for i, r in enumerate(requests):
            if i == 4 and gate is not None:
                await gate.wait()
            yield r
            await asyncio.sleep(0.02)
        await done.wait()  # never close our side: only the server may end the session

    call = stub.Converse(gen(), timeout=60)
    try:
        async for msg in call:
            kind = msg.WhichOneof("kind")
            out["kinds"].append(kind)
            if kind == "event":
                out["events"].append(msg.event)
            elif kind == "audio":
                out["audio"].append(msg.audio)
                if on_audio is not None:
                    on_audio(msg.audio)
        out["code"] = await call.code()
        out["details"] = await call.details()
    except grpc.aio.AioRpcError as exc:
        out["code"], out["details"] = exc.code(), exc.details() or ""
    finally:
        done.set()
    return out


@pytest.mark.parametrize("frames", [120, 8], ids=["client-keeps-sending", "client-pauses"])
@pytest.mark.parametrize("stage", ["codec", "lm"])
async def test_stalled_stage_ends_session_at_default_k_and_backlog(stage: str, frames) -> None:
    """Frames 0-3 make the round trip; then the stage freezes and frames 4.. are sent. A
    client that keeps sending gives K misses (late, then dropped for backlog while the stage
    is stalled); one that pauses after 8 frames gives no frame to count, and the stage watch
    (not answering for K frames' time) ends the session. DEADLINE_EXCEEDED either way."""
    settings = GatewaySettings(refresh_interval_s=0.1)
    d = GatewaySettings()
    assert (settings.default_max_consecutive_misses, settings.max_backlog_frames) == (
        d.default_max_consecutive_misses,
        d.max_backlog_frames,
    )
    stack = await start_stack(settings=settings)
    engine = (stack.codec if stage == "codec" else stack.lm).servicer.engine
    freezer = Freezer(engine.encoder if stage == "codec" else engine.scheduler)

    gate = asyncio.Event()

    def on_audio(a) -> None:
        if a.frame_index == 3:  # the pipeline worked; now the stage stops answering
            freezer.armed.set()
            gate.set()

    try:
        # Default budget and K: the SessionConfig sets neither.
        config = config_msg(24000, FLOAT32)
        reply = await _converse_until_server_ends(
            stack.stub, config, frames, on_audio=on_audio, gate=gate
        )
    finally:
        freezer.release()
        await stack.close()
    assert reply["code"] == grpc.StatusCode.DEADLINE_EXCEEDED, reply["details"]
    if frames == 8:
        assert "has not answered" in reply["details"]
        assert ("encode" if stage == "codec" else "step") in reply["details"]
    else:
        assert "consecutive" in reply["details"] or "has not answered" in reply["details"]
    assert reply["kinds"][-1] == "event"
    summary = reply["events"][-1].ended.summary
    assert summary.reason == "deadline_exceeded"
    assert summary.frames_late >= 1  # the first unanswered frame passed its deadline
    # Every frame the gateway took is answered, in order: the initial delay, the three that
    # made the round trip, then silence for every frame after the stage stalled, each one
    # counted as late or dropped.
    sent = reply["audio"]
    assert summary.frames_in == summary.frames_out == len(sent)
    assert [a.frame_index for a in sent] == list(range(summary.frames_out))
    assert [a.silence for a in sent[:4]] == [True, False, False, False]
    assert all(a.silence for a in sent[4:])
    assert summary.frames_late + summary.frames_dropped == summary.frames_out - 4
    if frames == 8:  # all eight taken; the four after the stall late, none dropped
        assert (summary.frames_out, summary.frames_late, summary.frames_dropped) == (8, 4, 0)
    else:  # it did not stream silence for the whole input
        assert summary.frames_out < frames
    # The metrics count each silent frame once, under its cause, as the summary does.
    assert _dropped(stack, "budget") == _count(stack, "budget_misses") == summary.frames_late
    assert _dropped(stack, "stalled") == summary.frames_dropped_stalled
    assert _dropped(stack, "overflow") == summary.frames_dropped - summary.frames_dropped_stalled
    started = reply["events"][0].started
    assert started.max_consecutive_misses == d.default_max_consecutive_misses
    assert started.budget_ms == d.default_budget_ms


async def test_stalled_stage_with_flow_control_input_ends_the_session() -> None:
    """Pre-recorded input: the gateway stops reading the client while the stage is stuck,
    so no frame is there to be counted as a miss; the stage watch ends the session (and the
    idle timeout does not: the gateway, not the client, stopped the input)."""
    settings = GatewaySettings(refresh_interval_s=0.1, idle_timeout_s=0.5)
    stack = await start_stack(settings=settings)
    freezer = Freezer(stack.lm.servicer.engine.scheduler)
    gate = asyncio.Event()

    def on_audio(a) -> None:
        if a.frame_index == 3:
            freezer.armed.set()
            gate.set()

    try:
        config = config_msg(24000, FLOAT32, input_pacing=gateway_pb2.INPUT_PACING_FLOW_CONTROL)
        reply = await _converse_until_server_ends(
            stack.stub, config, 60, on_audio=on_audio, gate=gate
        )
    finally:
        freezer.release()
        await stack.close()
    assert reply["code"] == grpc.StatusCode.DEADLINE_EXCEEDED, reply["details"]
    assert "has not answered" in reply["details"] and "(step)" in reply["details"]
    summary = reply["events"][-1].ended.summary
    assert summary.reason == "deadline_exceeded"
    assert summary.frames_dropped == 0  # flow control: nothing dropped, even stalled
    assert summary.frames_in < 60


async def test_fast_sender_keeps_its_session() -> None:
    """2 s of audio written in one message (real-time pacing, the default): the frames over
    the backlog are dropped as overflow (`backlog_full`), never as misses; the session ends
    OK when the client closes."""
    stack = await start_stack()
    try:
        x = audio.speech_like(4.0, 24000, seed=5)
        requests = [config_msg(24000, FLOAT32, budget_ms=10_000)] + audio_msgs(x, FLOAT32, [len(x)])
        reply = await converse(stack.stub, requests)
    finally:
        await stack.close()
    assert reply.code == grpc.StatusCode.OK, reply.details
    summary = reply.event("ended")[-1].summary
    assert summary.frames_in == summary.frames_out == 50
    assert summary.frames_dropped_stalled == 0
    drops = reply.event("frames_dropped")
    # 50 frames in one message against a backlog of 8: frames were dropped, all as overflow
    print(f"fast sender: {summary.frames_dropped} of 50 frames dropped")
    assert summary.frames_dropped > 0 and drops
    assert all(d.reason == "backlog_full" for d in drops)
    assert sum(d.count for d in drops) == summary.frames_dropped
    assert _dropped(stack, "overflow") == summary.frames_dropped
    assert _dropped(stack, "stalled") == _dropped(stack, "budget") == 0
    # Dropped frames are counted apart: the percentiles cover the others only.
    assert summary.latency_frames == summary.frames_out - summary.frames_dropped


async def test_flow_control_streams_a_file_with_no_drop() -> None:
    """INPUT_PACING_FLOW_CONTROL: the whole file in one message, and every frame comes back
    (the gateway reads input only when it has room at the backends)."""
    stack = await start_stack()
    try:
        x = audio.speech_like(4.0, 24000, seed=6)
        config = config_msg(
            24000,
            FLOAT32,
            budget_ms=10_000,
            max_consecutive_misses=0,
            input_pacing=gateway_pb2.INPUT_PACING_FLOW_CONTROL,
        )
        reply = await converse(stack.stub, [config] + audio_msgs(x, FLOAT32, [len(x)]))
    finally:
        await stack.close()
    assert reply.code == grpc.StatusCode.OK, reply.details
    assert reply.event("started")[0].input_pacing == gateway_pb2.INPUT_PACING_FLOW_CONTROL
    summary = reply.event("ended")[-1].summary
    assert summary.frames_in == summary.frames_out == 50
    assert summary.frames_dropped == 0 and not reply.event("frames_dropped")
    assert [a.frame_index for a in reply.audio] == list(range(50))
    # Echo backends: every frame after the LM's initial delay carries audio.
    assert all(not a.silence for a in reply.audio[1:])
    assert summary.latency_frames == 50


async def test_fresh_replica_refuses_a_1ms_budget() -> None:
    stack = await start_stack()
    try:
        reply = await converse(stack.stub, [config_msg(24000, FLOAT32, budget_ms=1)])
        ok = await converse(stack.stub, [config_msg(24000, FLOAT32)])
    finally:
        await stack.close()
    assert reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED, reply.details
    assert "cannot meet the 1 ms budget" in reply.details
    assert int(reply.trailing["retry-after-ms"]) > 0
    assert ok.code == grpc.StatusCode.OK  # the default budget is admitted
