"""The Moshi pipeline: client audio -> codec Encode -> LM Step -> codec Decode -> client audio.

    encode (codec) : a 1920-sample frame      -> the user's codes
    step   (lm)    : the user's codes         -> a text piece (to the client at once) and,
                     once the LM is ready, Moshi's codes; before that (its initial acoustic
                     delay) the frame ends as silence, not a miss
    decode (codec) : Moshi's codes            -> 1920 samples of reply

The LM stage is carried by an `LmLink` (the session moves to another LM replica when its
replica fails, by replaying its history); the codec stages by plain links (a codec failure
ends the session: Mimi's streaming state is not cheaply replayable).

Before live, a session with a persona (persona.py) runs the pipeline's start step: its
voice's codes (kept, or encoded on the leased codec replica) and its prompt go into the
LM's open, and the LM stage waits for the LM's answer to it (PromptReady) before the
session goes live.
"""

from __future__ import annotations

from typing import Any

from moshi_grpc import audio
from moshi_grpc.services.gateway import persona
from moshi_grpc.services.gateway.links import StageLink
from moshi_grpc.services.gateway.lm_link import LmLink
from moshi_grpc.services.gateway.pipeline import (
    FRAMES,
    OUTPUT,
    Backend,
    BadAnswer,
    OpenContext,
    Outcome,
    Pipeline,
    Rpcs,
    Stage,
)
from moshi_grpc.v1 import codec_pb2, codec_pb2_grpc, lm_pb2, lm_pb2_grpc

USER_CODES = "user_codes"  # the codes of the user's frame (Mimi's encoding of it)
MOSHI_CODES = "moshi_codes"  # the codes of Moshi's reply frame

# The codec's Info reports slots per stream kind (a session holds one Encode and one Decode
# slot; `slots_in_use` is the busier kind) and its step p50 as encode + decode.
CODEC = Backend("codec", codec_pb2_grpc.CodecStub, step_p50_stages=2)
LM = Backend("lm", lm_pb2_grpc.LMStub, names_model=True)


def codec_open(ctx: OpenContext) -> codec_pb2.CodecOpen:
    return codec_pb2.CodecOpen(session_id=ctx.session_id)


def lm_open(ctx: OpenContext) -> lm_pb2.LmOpen:
    """The LM's open: sampling, seed and, with a persona, its prompt (also on a failover's
    reopen: the new replica applies the prompt, then the replayed history)."""
    return lm_pb2.LmOpen(
        session_id=ctx.session_id,
        sampling=ctx.params.sampling,
        seed=ctx.params.seed,
        persona=persona.prompt(ctx),
    )


def pcm_request(index: int, frame: Any) -> dict:
    """A PcmFrame's fields (built once, inside the stream's request message)."""
    return {"index": index, "pcm_f32le": audio.array_to_f32le(frame)}


def codes_request(index: int, codes: Any) -> dict:
    """A UserCodes' or CodesFrame's fields."""
    return {"index": index, "codes": codes}


def encoded(msg: codec_pb2.CodesFrame) -> Outcome:
    return Outcome(forward=msg.codes)


def stepped(msg: lm_pb2.StepOutput) -> Outcome:
    if msg.ready:
        return Outcome(forward=msg.moshi_codes, text=msg.text_piece)
    return Outcome(text=msg.text_piece)  # the initial acoustic delay: silence


def decoded(msg: codec_pb2.PcmFrame) -> Outcome:
    pcm = audio.f32le_to_array(msg.pcm_f32le)
    if pcm.size != audio.FRAME_SIZE:
        raise BadAnswer(f"returned {pcm.size} samples instead of {audio.FRAME_SIZE}")
    return Outcome(pcm=pcm)


def _codec_stage(rpc: str, takes: str, gives: str, request: Any, answer: Any) -> Stage:
    """A stage of the codec service (RPC `rpc`), on a plain link: never moved."""
    rpcs = Rpcs.named(codec_pb2, rpc)
    return Stage(rpc.lower(), CODEC, rpcs, takes, gives, codec_open, request, answer, StageLink)


def _lm_stage(rpc: str, takes: str, gives: str, answer: Any) -> Stage:
    """A stage of the LM service (RPC `rpc`), on an LmLink: moved when its replica fails.
    The LM steps every session together: a frame may wait one whole step (`phase`)."""
    rpcs = Rpcs.named(lm_pb2, rpc)
    return Stage(
        rpc.lower(),
        LM,
        rpcs,
        takes,
        gives,
        lm_open,
        codes_request,
        answer,
        LmLink,
        phase=True,
        open_answer=persona.PROMPT_READY,
    )


ENCODE = _codec_stage("Encode", FRAMES, USER_CODES, pcm_request, encoded)
STEP = _lm_stage("Step", USER_CODES, MOSHI_CODES, stepped)
DECODE = _codec_stage("Decode", MOSHI_CODES, OUTPUT, codes_request, decoded)


async def apply_persona(ctx: OpenContext) -> None:
    """The start step: a persona's voice codes (on the leased codec, through ENCODE's RPC)
    and prompt for the LM's open (persona.apply); nothing for a session without one."""
    await persona.apply(ctx, ENCODE)


# Admission picks the LM replica first: it is the scarce one.
MOSHI = Pipeline(
    "moshi", backends=(LM, CODEC), stages=(ENCODE, STEP, DECODE), start=(apply_persona,)
)
