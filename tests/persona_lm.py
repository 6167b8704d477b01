"""A stand-in LM replica that speaks the persona contract (protos/moshi_grpc/v1/lm.proto), for
the gateway's persona tests: real gRPC on loopback, Step and StepMux, health and Info.

It keeps what each open carried (`opens`) and answers as the contract says:

- an open with a persona on a persona model: after `release` is set (a test holds the
  prompt with it), ONE `StepOutput{index 0, ready false, prompt: PromptReady}` before any
  frame's answer; `cached` is true when the same (voice codes, text) was applied before;
- FAILED_PRECONDITION for a persona on a model without one and for no persona on a persona
  model; INVALID_ARGUMENT for an empty prompt and for a prompt whose frames (voice + 6 + the
  text's characters + 6, a stand-in for its tokens) exceed `context`;
- frames: an echo with one step of delay (frame t answers with the codes of frame t - 1,
  text padding), continuing after a replayed history.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moshi_grpc.v1 import common_pb2, lm_pb2, lm_pb2_grpc

SILENCE_FRAMES = 6  # after the voice and after the text, as PersonaPlex


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Session:
    steps: int = 0
    last: list[int] = field(default_factory=list)

    def answer(self, index: int, codes: list[int]) -> lm_pb2.StepOutput:
        out = lm_pb2.StepOutput(index=index, ready=self.steps >= 1)
        if out.ready:
            out.text_token = 3
            out.moshi_codes.extend(self.last)
        self.steps += 1
        self.last = list(codes)
        return out


class PersonaLm(lm_pb2_grpc.LMServicer):
    """See the module docstring. `persona`: whether it serves a persona model."""

    def __init__(self, persona: bool = True, context: int = 3000, slots: int = 8) -> None:
        self.persona = persona
        self.context = context
        self.slots = slots
        self.opens: list[lm_pb2.LmOpen] = []
        self.frames = 0  # frames answered (any session)
        self.release = asyncio.Event()
        self.release.set()
        self.opened = asyncio.Event()  # set at every open
        self.prompts_ready = 0  # PromptReady answers given
        self._applied: set[tuple[tuple[int, ...], str]] = set()
        self.live = 0
        self.server: grpc.aio.Server | None = None
        self.address = ""

    def info(self) -> common_pb2.BackendInfo:
        return common_pb2.BackendInfo(
            model_name="moshi-lm",
            config_name="personaplex-fake" if self.persona else "plain-fake",
            slots_total=self.slots,
            slots_in_use=self.live,
            num_codebooks=8,
            codebook_size=2048,
            persona=self.persona,
        )

    async def Info(self, request, context) -> common_pb2.BackendInfo:
        return self.info()

    async def _open(self, msg: lm_pb2.LmOpen) -> tuple[_Session, lm_pb2.StepOutput | None]:
        self.opens.append(msg)
        self.opened.set()
        has = msg.HasField("persona")
        if has and not self.persona:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this model takes no persona")
        if self.persona and not has:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "a persona model needs a persona")
        session = _Session()
        for step in msg.replay:
            session.steps += 1
            session.last = list(step.user_codes)
        if not has:
            return session, None
        prompt = msg.persona
        if not prompt.text.strip():
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the persona's text is empty")
        frames = len(prompt.voice_codes) // 8 + 2 * SILENCE_FRAMES + len(prompt.text)
        if frames > self.context:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the prompt takes {frames} frames, more than the context of {self.context}",
            )
        await self.release.wait()
        key = (tuple(prompt.voice_codes), prompt.text)
        cached = key in self._applied
        self._applied.add(key)
        ready = lm_pb2.PromptReady(
            prefix_frames=frames, cached=cached, cached_frames=frames if cached else 0
        )
        self.prompts_ready += 1
        return session, lm_pb2.StepOutput(index=0, ready=False, prompt=ready)

    async def Step(self, request_iterator, context):
        session = None
        self.live += 1
        try:
            async for request in request_iterator:
                if request.WhichOneof("kind") == "open":
                    try:
                        session, first = await self._open(request.open)
                    except Refused as exc:
                        await context.abort(exc.code, str(exc))
                    if first is not None:
                        yield first
                    continue
                self.frames += 1
                yield session.answer(request.frame.index, list(request.frame.codes))
        finally:
            self.live -= 1

    async def StepMux(self, request_iterator, context):
        sessions: dict[int, _Session] = {}
        out: asyncio.Queue = asyncio.Queue()

        async def handle() -> None:
            async for request in request_iterator:
                for entry in request.entries:
                    kind = entry.WhichOneof("kind")
                    sid = entry.session
                    if kind == "open":
                        try:
                            session, first = await self._open(entry.open)
                        except Refused as exc:
                            end = common_pb2.MuxEnd(code=exc.code.value[0], message=str(exc))
                            await out.put(lm_pb2.StepMuxResult(session=sid, end=end))
                            continue
                        sessions[sid] = session
                        self.live += 1
                        if first is not None:
                            await out.put(lm_pb2.StepMuxResult(session=sid, frame=first))
                    elif kind == "frame" and sid in sessions:
                        self.frames += 1
                        answer = sessions[sid].answer(entry.frame.index, list(entry.frame.codes))
                        await out.put(lm_pb2.StepMuxResult(session=sid, frame=answer))
                    elif kind in ("close", "cancel") and sid in sessions:
                        del sessions[sid]
                        self.live -= 1
                        if kind == "close":
                            end = common_pb2.MuxEnd(code=0)
                            await out.put(lm_pb2.StepMuxResult(session=sid, end=end))
            await out.put(None)

        task = asyncio.get_running_loop().create_task(handle())
        try:
            while (result := await out.get()) is not None:
                yield lm_pb2.StepMuxResponse(results=[result])
        finally:
            task.cancel()
            self.live -= len(sessions)

    async def start(self) -> str:
        server = grpc.aio.server()
        lm_pb2_grpc.add_LMServicer_to_server(self, server)
        h = health.aio.HealthServicer()
        await h.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(h, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.server = server
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
