"""LM servicer: proto <-> engine. Every message is validated before it reaches a batch
(one bad frame must never fail the batched step of the other sessions).

Step is a `Stage` (services/common/mux.py) served two ways: per session (`Step`) and
multiplexed (`StepMux`), with the same validation, replay and accounting."""

from __future__ import annotations

import logging
from typing import Any

import torch

from moshi_grpc.models.persona import PersonaError, check_prompt_fits, wrap_prompt
from moshi_grpc.services.common.backend import ModelServicer, backend_info
from moshi_grpc.services.common.errors import InvalidInput, WrongModel
from moshi_grpc.services.common.metrics import LmMetrics
from moshi_grpc.services.common.mux import Opened
from moshi_grpc.services.common.request_streams import stream_closer
from moshi_grpc.services.common.wire import bucket_timings, parse_codes, timing_proto
from moshi_grpc.services.lm.engine import JoinPayload, LmEngine, Prefill, Start, StepInput
from moshi_grpc.services.lm.prompts import PersonaRequest
from moshi_grpc.v1 import common_pb2, lm_pb2, lm_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "moshi_grpc.v1.LM"


def sampling_from_proto(params: common_pb2.SamplingParams) -> Any:
    """SamplingConfig with the server defaults for unset fields; InvalidInput if bad."""
    from moshi_grpc.models.lm_gen import SamplingConfig

    defaults = SamplingConfig()
    values = {}
    for name in ("text_temperature", "text_top_k", "audio_temperature", "audio_top_k"):
        values[name] = getattr(params, name) if params.HasField(name) else getattr(defaults, name)
    try:
        return SamplingConfig(**values)
    except ValueError as exc:
        raise InvalidInput(f"sampling: {exc}") from None


def parse_persona(persona: lm_pb2.PersonaPrompt, engine: LmEngine) -> PersonaRequest:
    """Validate a persona (voice codes, role text) for this replica's model and tokenize its
    prompt with the model's tokenizer; WrongModel for a model that takes none."""
    if not engine.persona:
        raise WrongModel(
            f"this LM replica serves {engine.lm.config_name}, which takes no persona (a "
            "persona needs a PersonaPlex model)"
        )
    codes = list(persona.voice_codes)
    q = engine.dep_q
    if not codes or len(codes) % q:
        raise InvalidInput(
            f"persona.voice_codes must hold a whole number (>= 1) of {q}-code frames, "
            f"got {len(codes)} codes"
        )
    voice = torch.stack(
        [
            parse_codes(codes[i : i + q], q, engine.card, f"persona.voice_codes[{i}:{i + q}]")
            for i in range(0, len(codes), q)
        ]
    )
    if not persona.text.strip():
        raise InvalidInput("persona.text (the role prompt) is empty")
    tokens = engine.tokenizer.encode(wrap_prompt(persona.text))
    try:
        check_prompt_fits(int(voice.shape[0]), len(tokens), engine.lm.config.context)
    except PersonaError as err:
        raise InvalidInput(str(err)) from None
    return PersonaRequest(voice, tokens, persona.text)


def parse_replay(replay: Any, engine: LmEngine, start: int = 0) -> list[StepInput | Prefill]:
    """Validate the history and turn it into one prefill plus the steps left to run.

    The history holds what each step emitted (delay-aligned); the generator's stream layout
    (`StreamLayout.replay_prefix`) recovers what each step sampled and how long a prefix of
    the history can be rebuilt in one prefill (a few batched forwards, no sampling). The
    remaining steps (at least the last max_delay, whose tokens were not emitted yet) run as
    ordinary steps: draws are a function of (seed, step), so with the same seed and
    sampling they sample the same tokens again and the session continues exactly as it
    would have.
    """
    steps = list(replay)
    emitted: list[tuple[int, list[int]] | None] = []
    user: list[torch.Tensor] = []
    for s, step in enumerate(steps):
        user.append(
            parse_codes(step.user_codes, engine.n_user, engine.card, f"replay[{s}].user_codes")
        )
        if step.HasField("text_token"):
            if not 0 <= step.text_token < engine.text_card:
                raise InvalidInput(
                    f"replay[{s}].text_token = {step.text_token} is out of range "
                    f"[0, {engine.text_card})"
                )
            audio = parse_codes(
                step.moshi_codes, engine.dep_q, engine.card, f"replay[{s}].moshi_codes"
            )
            emitted.append((int(step.text_token), audio.tolist()))
        else:
            if len(step.moshi_codes):
                raise InvalidInput(
                    f"replay[{s}].moshi_codes must be empty when text_token is unset"
                )
            emitted.append(None)
    if not steps:
        return []
    prefix, text, audio = engine.gen.layout.replay_prefix(emitted, start)
    out: list[StepInput | Prefill] = []
    if prefix:
        out.append(Prefill(torch.stack(user[:prefix]), text[:prefix], audio[:prefix]))
    out.extend(StepInput(user[s]) for s in range(prefix, len(steps)))
    return out


class LmStage:
    """The Step stage of an attached engine: see `mux.Stage`."""

    what = "Step"

    def __init__(self, engine: LmEngine, metrics: LmMetrics | None) -> None:
        self.engine = engine
        self.metrics = metrics

    def open(self, opened: lm_pb2.LmOpen) -> Opened:
        """Validate the open (sampling, persona, replay) before taking a slot. The session's
        persona prompt and the prefillable part of its replayed history go first, as one
        `Start` payload; the replayed steps left run as ordinary steps."""
        engine = self.engine
        sampling = sampling_from_proto(opened.sampling)
        seed = int(opened.seed) if opened.HasField("seed") else None
        persona = None
        if opened.HasField("persona"):
            persona = parse_persona(opened.persona, engine)
        elif engine.persona:
            raise WrongModel(
                f"this LM replica serves a persona model ({engine.lm.config_name}): every "
                "session needs a persona (voice and role prompt)"
            )
        start_step = 0
        if persona is not None:  # the history continues the prompt's prefix
            start_step = persona.frames - 1
        replay = parse_replay(opened.replay, engine, start_step)
        prefill = replay.pop(0) if replay and isinstance(replay[0], Prefill) else None
        preamble: list[Any] = []
        if persona is not None or prefill is not None:
            preamble.append(Start(persona, prefill))
        preamble.extend(replay)
        slot = engine.scheduler.acquire(JoinPayload(sampling, seed), opened.session_id)
        step_metrics = self.metrics.step if self.metrics else None
        return Opened(slot, stream_closer(slot, step_metrics), preamble, len(opened.replay))

    def parse(self, frame: lm_pb2.UserCodes) -> StepInput:
        engine = self.engine
        return StepInput(parse_codes(frame.codes, engine.n_user, engine.card, "codes"))

    def respond(self, index: int, out: Any, timing: Any) -> lm_pb2.StepOutput:
        if out.ready:
            return lm_pb2.StepOutput(
                index=index,
                ready=True,
                text_token=out.text,
                text_piece=self.engine.piece(out.text),
                moshi_codes=out.audio,
                timing=timing_proto(timing),
            )
        return lm_pb2.StepOutput(index=index, ready=False, timing=timing_proto(timing))

    def answer_preamble(self, payload: Any, result: Any, timing: Any) -> Any:
        """Counts replayed steps; a prompt's Start is answered (PromptReady)."""
        m = self.metrics
        if isinstance(payload, Start):
            if m is not None and payload.replay is not None:
                m.replayed_steps.inc(payload.replay.user_codes.shape[0])
            if payload.persona is None:
                return None
            if m is not None:
                m.prompt_ready_seconds.observe(result.ready_ms / 1000.0)
            return lm_pb2.StepOutput(
                index=0,
                ready=False,
                timing=timing_proto(timing),
                prompt=lm_pb2.PromptReady(
                    prefix_frames=result.prompt_frames,
                    cached=result.cached,
                    cached_frames=result.cached_frames,
                    ready_ms=result.ready_ms,
                ),
            )
        if m is not None:
            m.replayed_steps.inc(1)
        return None


class LmServicer(ModelServicer, lm_pb2_grpc.LMServicer):
    """Step streams over an engine that is attached once the model is loaded."""

    what = "LM model"
    grpc_service = SERVICE_NAME
    register = staticmethod(lm_pb2_grpc.add_LMServicer_to_server)
    metrics_type = LmMetrics

    _stage: LmStage | None = None  # set by attach()

    def attach(self, engine: LmEngine) -> None:
        self._stage = LmStage(engine, self.metrics)
        self.engine = engine

    async def Step(self, request_iterator, context):
        self._engine()
        async for out in self._serve(self._stage, request_iterator, context):
            yield out

    async def StepMux(self, request_iterator, context):
        self._engine()
        response = lm_pb2.StepMuxResponse
        async for out in self._serve_mux(self._stage, response, request_iterator, context):
            yield out

    async def Info(self, request, context) -> common_pb2.BackendInfo:
        engine = self._engine()
        p50, p99 = engine.scheduler.step_percentiles_ms()
        return backend_info(
            engine,
            engine.lm,
            self.state,
            slots_in_use=engine.scheduler.slots_in_use,
            step_p50_ms=p50,
            step_p99_ms=p99,
            num_codebooks=engine.dep_q,
            sample_rate=24000,
            frame_size=1920,
            codebook_size=engine.card,
            text_vocab_size=engine.text_card,
            buckets=bucket_timings(engine.scheduler, "step"),
            persona=engine.persona,
            prefix_cache=_cache_info(engine),
        )


def _cache_info(engine: LmEngine) -> common_pb2.PrefixCacheInfo | None:
    cache = engine.prefix_cache
    if cache is None:
        return None
    return common_pb2.PrefixCacheInfo(capacity_bytes=cache.capacity, **vars(cache.stats()))
