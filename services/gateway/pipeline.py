"""A gateway pipeline, declared as data: which backends a conversation needs, which stages
its frames go through, and what each stage sends, opens with and answers.

The session (session.py) runs whatever pipeline it is given: it opens one stream per stage
on the replica its lease pinned for that stage's backend, feeds the client's 24 kHz frames
to the first stage, and hands each stage's answer to the next one, or ends the frame there.
Replica pools, leases, the admission estimate, the stage watch and the metrics are keyed by
the backends and stages declared here, so a new pipeline (another model of the Moshi family,
a text-only variant) is a new declaration, not an edit of the session.

Three extension points say what happens before a session goes live:

- `Stage.open(ctx)` builds the message that opens a stage's stream: what a backend session
  starts with (its id, sampling, seed, a prompt...). It reads `ctx.values`, which
- `Pipeline.start` fills: async steps run once the session is admitted and before any stage
  opens, with the session's lease at hand (for example: encode a voice prompt on the leased
  codec replica and leave its codes in `ctx.values` for the LM's open).
- `Stage.open_answer`: a backend that answers an open before any frame (the LM's
  PromptReady once a persona prompt is in the model). The stage's link waits for that
  answer before the session goes live, and never takes it for a frame's.

Today's pipeline is `moshi_pipeline.MOSHI` (encode -> step -> decode).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# What flows between stages (`Stage.takes` / `Stage.gives`), checked when a pipeline is built.
FRAMES = "frames"  # the client's audio, 24 kHz frames of 1920 samples: the first stage takes it
OUTPUT = "output"  # the last stage gives each frame's output (its audio, or silence)


@dataclass(frozen=True)
class Backend:
    """A kind of backend service: its replicas form one pool, a lease pins one of them per
    session, and its name labels the metrics (`backends_healthy{service}`, failovers)."""

    kind: str  # "codec", "lm": pool key, metric label, `--<kind>-addr` flag
    stub: Callable[[Any], Any]  # the generated stub class, built on a replica's channel
    slots_per_session: int = 1  # slots one session takes in the replica's Info count
    # Stages summed in its Info's `step_p50_ms` (the codec reports encode + decode): how a
    # replica without per-bucket timings is costed per stage.
    step_p50_stages: int = 1
    # Its Info's model and config name the session's model (`SessionStarted.model`).
    names_model: bool = False


@dataclass(frozen=True)
class Rpcs:
    """A stage's backend RPCs: one stream per session, or a shared multiplexed one."""

    per_session: str  # e.g. "Encode"
    request: type  # its request message (a oneof of `open` and `frame`)
    mux: str  # e.g. "EncodeMux"
    mux_request: type

    @classmethod
    def named(cls, module: Any, rpc: str) -> Rpcs:
        """`rpc` and `<rpc>Mux` of a generated `*_pb2` module, with their requests named
        `<rpc>Request` / `<rpc>MuxRequest` (our protos' convention)."""
        mux = f"{rpc}Mux"
        return cls(rpc, getattr(module, f"{rpc}Request"), mux, getattr(module, f"{mux}Request"))


@dataclass(slots=True)
class Outcome:
    """What one backend answer carries on. `forward` not None: the payload goes to the next
    stage. Otherwise the frame ends here, with `pcm` (24 kHz audio) or silence (None: the
    LM's initial delay, or a pipeline without audio out; not a miss). `text`: a text piece
    for the client (sent at once, whatever else happens to the frame)."""

    forward: Any = None
    text: str = ""
    pcm: np.ndarray | None = None


class BadAnswer(Exception):
    """A backend answer that a stage cannot use (the link reports its replica as failed)."""


@dataclass
class OpenContext:
    """What a stage's `open` and the pipeline's start steps see. `values` is where start
    steps leave what the opens need (empty for the Moshi pipeline)."""

    session_id: str
    params: Any  # config.SessionParams
    lease: Any  # replicas.Lease: the session's replica per backend kind
    metadata: tuple[tuple[str, str], ...] = ()  # backend auth, for streams a step opens
    values: dict[str, Any] = field(default_factory=dict)


# Work before live: run after admission, before the stages open (see the module docstring).
StartStep = Callable[[OpenContext], Awaitable[None]]


@dataclass(frozen=True)
class OpenAnswer:
    """An answer a stage's backend gives to the stream's open, before any frame's."""

    expected: Callable[[Any], bool]  # the open message -> whether it gets such an answer
    matches: Callable[[Any], bool]  # a backend message -> whether it is that answer
    # Told the answer, and the seconds from the open's send to it (the first open only: a
    # stream reopened on another replica gets its answer too, which the link drops).
    received: Callable[[OpenContext, Any, float], None]


@dataclass(frozen=True)
class Stage:
    """One step of every frame: a stream per session on a replica of `backend`."""

    name: str  # "encode", "step", "decode": stage label of metrics, traces, the stage watch
    backend: Backend
    rpcs: Rpcs
    takes: str  # what it is fed: FRAMES for the first stage, else what the one before gives
    gives: str  # what it hands on: OUTPUT for the last stage
    open: Callable[[OpenContext], Any]  # the message that opens its stream
    request: Callable[[int, Any], dict]  # (stream index, payload) -> the frame's fields
    answer: Callable[[Any], Outcome]  # a backend answer -> what it carries on
    link: Callable[..., Any]  # links.StageLink or a subclass: who owns its stream
    # Admission: a frame may wait one whole step of this stage before its own (the backend
    # steps all its sessions together and a tick may have just started).
    phase: bool = False
    open_answer: OpenAnswer | None = None  # see OpenAnswer


@dataclass(frozen=True)
class Pipeline:
    """A conversation's backends and stages. `backends` is the order in which admission
    picks their replicas (the scarcest first)."""

    name: str
    backends: tuple[Backend, ...]
    stages: tuple[Stage, ...]
    start: tuple[StartStep, ...] = ()

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"pipeline {self.name}: no stage")
        kinds = [b.kind for b in self.backends]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"pipeline {self.name}: a backend kind is listed twice")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline {self.name}: a stage name is used twice")
        flow = FRAMES
        for stage in self.stages:
            if stage.backend not in self.backends:
                raise ValueError(f"pipeline {self.name}: stage {stage.name} has no backend")
            if stage.takes != flow:
                raise ValueError(
                    f"pipeline {self.name}: stage {stage.name} takes {stage.takes!r}, "
                    f"but gets {flow!r}"
                )
            flow = stage.gives
        if flow != OUTPUT:
            raise ValueError(f"pipeline {self.name}: the last stage gives {flow!r}, not output")

    def stages_of(self, backend: Backend) -> tuple[Stage, ...]:
        """The stages that run on `backend`'s replicas, in pipeline order."""
        return tuple(s for s in self.stages if s.backend == backend)
