"""A pipeline is data (services/gateway/pipeline.py): a second one, declared here and nowhere
in the gateway, runs real sessions on loopback against the echo backends.

The pipeline is encode -> step, text only: the LM's answer ends each frame (its reply audio
is silence) and its text is Moshi's codes written out, which the echo backends make
predictable (the echo codec's codes are the frame's levels quantised, the echo LM answers
step t with the user's codes of step t - 1). It also has a start step, the extension point a
persona prompt needs: before the session goes live it encodes a prompt frame on the leased
codec replica and leaves the codes for the LM stage's open message.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_pipeline
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.gateway.moshi_pipeline import (
    CODEC,
    DECODE,
    ENCODE,
    LM,
    MOSHI,
    STEP,
    lm_open,
    pcm_request,
)
from moshi_grpc.services.gateway.pipeline import OUTPUT, OpenContext, Outcome, Pipeline
from moshi_grpc.services.gateway.streams import PER_SESSION, open_stream
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import codec_pb2, gateway_pb2, gateway_pb2_grpc, lm_pb2

FRAME = 1920


def _levels_frame(levels: np.ndarray) -> np.ndarray:
    """A 24 kHz frame of 8 segments, one level each (the echo codec's 8 codes)."""
    return np.repeat(levels.astype(np.float32), FRAME // len(levels))


def _echo_codes(levels: np.ndarray) -> list[int]:
    return [int(c) for c in np.floor((levels + 1.0) * 1024).clip(0, 2047)]


def _codes_as_text(msg: lm_pb2.StepOutput) -> Outcome:
    """Text only: every frame ends at the LM, with Moshi's codes as its text piece."""
    return Outcome(text=" ".join(map(str, msg.moshi_codes)) if msg.ready else "")


def _text_pipeline(prompt: np.ndarray, opened: list) -> Pipeline:
    async def encode_prompt(ctx: OpenContext) -> None:
        """Work before live: one frame through the leased codec replica's Encode."""
        stream = open_stream(ctx.lease.replicas["codec"], ENCODE, ctx.metadata, PER_SESSION)
        await stream.open(codec_pb2.CodecOpen(session_id=f"{ctx.session_id}-prompt"))
        await stream.send(pcm_request(0, _levels_frame(prompt)))
        await stream.done_writing()
        answer = await stream.read()
        assert await stream.read() is grpc.aio.EOF
        ctx.values["prompt_codes"] = list(answer.codes)

    def open_step(ctx: OpenContext) -> lm_pb2.LmOpen:
        message = lm_open(ctx)
        opened.append((ctx.values.get("prompt_codes"), message))
        return message

    step = dataclasses.replace(STEP, gives=OUTPUT, answer=_codes_as_text, open=open_step)
    return Pipeline("text", backends=(LM, CODEC), stages=(ENCODE, step), start=(encode_prompt,))


async def test_a_pipeline_declared_outside_the_gateway_runs_a_session() -> None:
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
    codec = await start_codec_server(cfg, CodecOptions(model="echo", max_wait_ms=0.0))
    lm = await start_lm_server(cfg, LmOptions(model="echo", max_wait_ms=0.0))
    rng = np.random.default_rng(3)
    n = 6
    levels = rng.uniform(-0.9, 0.9, size=(n, 8))
    prompt = rng.uniform(-0.9, 0.9, size=8)
    opened: list = []
    gateway = await start_pipeline(
        cfg,
        _text_pipeline(prompt, opened),
        {"codec": codec.address, "lm": lm.address},
        GatewaySettings(refresh_interval_s=0.05),
    )
    messages = []
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Converse(timeout=30)
            config = gateway_pb2.SessionConfig(
                sample_rate=24000,
                encoding=gateway_pb2.AUDIO_ENCODING_FLOAT32,
                budget_ms=5000,
                max_consecutive_misses=0,
            )
            await call.write(gateway_pb2.ConverseRequest(config=config))
            for t in range(n):
                data = _levels_frame(levels[t]).astype("<f4").tobytes()
                await call.write(
                    gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=data))
                )
            await call.done_writing()
            while (msg := await call.read()) is not grpc.aio.EOF:
                messages.append(msg)
            assert await call.code() == grpc.StatusCode.OK, await call.details()
        stage_count = {
            stage: gateway.registry.get_sample_value(
                "moshi_gateway_stage_seconds_count", {"stage": stage}
            )
            for stage in ("encode", "step", "decode")
        }
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
    started = messages[0].event.started
    assert started.codec_replica == codec.address and started.lm_replica == lm.address
    # The start step ran before the LM stage opened, on the leased codec replica.
    ((prompt_codes, lm_open_msg),) = opened
    assert prompt_codes == _echo_codes(prompt)
    assert lm_open_msg.session_id == started.session_id
    texts = [(m.text.frame_index, m.text.text) for m in messages if m.WhichOneof("kind") == "text"]
    expected = [(t, " ".join(map(str, _echo_codes(levels[t - 1])))) for t in range(1, n)]
    assert texts == expected
    frames = [m.audio for m in messages if m.WhichOneof("kind") == "audio"]
    assert [f.frame_index for f in frames] == list(range(n))
    assert all(f.silence for f in frames)  # no audio out in this pipeline
    summary = messages[-1].event.ended.summary
    assert (summary.frames_in, summary.frames_out, summary.frames_late) == (n, n, 0)
    assert summary.reason == "client_closed"
    # Frames went through the pipeline's two stages, never through a decode stage.
    assert stage_count == {"encode": n, "step": n, "decode": None}


def test_a_pipeline_whose_stages_do_not_connect_is_refused() -> None:
    with pytest.raises(ValueError, match="stage step takes 'user_codes', but gets 'frames'"):
        Pipeline("bad", backends=MOSHI.backends, stages=(STEP, DECODE))
    with pytest.raises(ValueError, match="the last stage gives 'moshi_codes', not output"):
        Pipeline("short", backends=MOSHI.backends, stages=(ENCODE, STEP))
    with pytest.raises(ValueError, match="stage step has no backend"):
        Pipeline("no lm", backends=(CODEC,), stages=(ENCODE, STEP, DECODE))
