"""The LM engine: one Moshi LM replica, its batched generator (LMGen) and a scheduler.

Each Step stream holds one slot; its state lies in a generator row, reset with the stream's
sampling parameters and seed when it joins. Live sessions stay packed into the first rows and
a tick steps only the smallest bucket of rows holding its frames (services/common/buckets.py).
Replay (failover) rebuilds a row from the recorded history in one prefill (`Prefill`, a few
batched forwards of the temporal transformer), then the last steps, whose tokens were not
emitted yet, run as ordinary steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moshi_grpc.services.common.batching import (
    DEFAULT_IDLE_PROBE_S,
    DEFAULT_MAX_SESSIONS,
    BatchScheduler,
)
from moshi_grpc.services.common.buckets import RowTable
from moshi_grpc.services.common.cuda_graphs import BucketGraphs, use_cuda_graphs
from moshi_grpc.services.common.metrics import LmMetrics

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LmOptions:
    """Model and batching settings of an LM replica (the CLI flags)."""

    model: str = "real"  # "real" | "echo"
    weights: str | None = None
    config: str = "small"
    tokenizer: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_wait_ms: float = 5.0
    inject_delay_ms: float = 0.0
    seed: int = 0
    cuda_graphs: str = "auto"  # auto | on | off (see services/common/cuda_graphs.py)
    cpu_forms: str = "auto"  # auto | on | off (see moshi_grpc/models/cpu_fast.py)
    warmup_repeats: int = 3  # timed warm-up steps per bucket at load (0: one untimed step)
    idle_probe_s: float = DEFAULT_IDLE_PROBE_S


@dataclass(frozen=True)
class StepInput:
    """One frame for the generator: user codes, and recorded tokens when forcing."""

    user_codes: torch.Tensor  # (n_user,) long
    force_text: int | None = None
    force_audio: torch.Tensor | None = None  # (dep_q,) long


@dataclass(frozen=True)
class Prefill:
    """A replayed history to rebuild in one go before a session's first frame (failover):
    the user codes of its first T steps and the tokens each of those steps sampled."""

    user_codes: torch.Tensor  # (T, n_user) long
    text: torch.Tensor  # (T,) long
    audio: torch.Tensor  # (T, dep_q) long


@dataclass(frozen=True)
class StepOut:
    ready: bool
    text: int
    audio: list[int]


NOT_READY_OUT = StepOut(False, -1, [])


@dataclass(frozen=True)
class JoinPayload:
    sampling: Any
    seed: int | None


def load_lm_model(options: LmOptions) -> tuple[Any, Any]:
    """(lm, tokenizer-or-None) described by `options`."""
    if options.model == "echo":
        from moshi_grpc.services.lm.echo import EchoLM

        return EchoLM(), None
    if options.model != "real":
        raise ValueError(f"unknown LM model {options.model!r} (real or echo)")
    if options.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {options.dtype!r}; one of {', '.join(DTYPES)}")
    from moshi_grpc.models.cpu_fast import prepare_lm_for_cpu
    from moshi_grpc.models.lm import load_lm
    from moshi_grpc.models.text import TextTokenizer

    lm = load_lm(
        options.weights,
        config=options.config,
        device=options.device,
        dtype=DTYPES[options.dtype],
        seed=options.seed,
    )
    prepare_lm_for_cpu(lm, options.cpu_forms)  # faster CPU kernels; nothing elsewhere
    return lm, TextTokenizer(options.tokenizer)


def make_generator(lm: Any, num_rows: int) -> Any:
    if getattr(lm, "config_name", "") == "echo":
        from moshi_grpc.services.lm.echo import EchoLMGen

        return EchoLMGen(lm, num_rows)
    from moshi_grpc.models.lm_gen import LMGen

    return LMGen(lm, num_rows)


class GenRunner:
    """The scheduler's BatchRunner over a generator: slots map to rows kept packed
    (`RowTable`), and a tick steps the smallest bucket of rows holding its frames."""

    def __init__(self, gen: Any, num_slots: int, n_user: int, dep_q: int, graphs: bool) -> None:
        self.gen = gen
        self.num_slots = num_slots
        self.n_user = n_user
        self.dep_q = dep_q
        self.table = RowTable(num_slots)
        self.ladder = self.table.ladder
        self.graphs: BucketGraphs | None = None
        if graphs and hasattr(gen, "core"):
            shape = gen.full_shape()
            self.graphs = BucketGraphs(lambda *inputs: gen.core(*inputs, shape=shape))
            gen.captured = self.graphs.run

    @torch.inference_mode()
    def join(self, slot: int, payload: JoinPayload) -> None:
        self.gen.reset(self.table.join(slot), payload.sampling, payload.seed)

    @torch.inference_mode()
    def leave(self, slot: int) -> None:
        try:
            row = self.table.row_of(slot)
        except RuntimeError:
            return  # left before its join was applied
        move = self.table.leave(slot)
        if move is None:
            self.gen.free(row)
        else:
            self.gen.move_row(move.src, move.dst)
            self.gen.free(move.src)

    @torch.inference_mode()
    def run(
        self, slots: Sequence[int], payloads: Sequence[StepInput | Prefill]
    ) -> tuple[list[StepOut], int]:
        results: list[StepOut] = [NOT_READY_OUT] * len(slots)
        stepped = []
        for i, (slot, p) in enumerate(zip(slots, payloads)):
            if isinstance(p, Prefill):
                self.gen.prefill(self.table.row_of(slot), p.user_codes, p.text, p.audio)
            else:
                stepped.append(i)
        if not stepped:
            return results, 0
        plan = self.table.plan([slots[i] for i in stepped])
        b = plan.bucket
        codes = torch.zeros((b, self.n_user), dtype=torch.long)
        active = torch.zeros(b, dtype=torch.bool)
        for i, row in zip(stepped, plan.rows):
            codes[row] = payloads[i].user_codes
            active[row] = True
        kwargs: dict[str, Any] = {}
        forced = [
            (i, row) for i, row in zip(stepped, plan.rows) if payloads[i].force_text is not None
        ]
        if forced:
            force = torch.zeros(b, dtype=torch.bool)
            force_text = torch.zeros(b, dtype=torch.long)
            force_audio = torch.zeros((b, self.dep_q), dtype=torch.long)
            for i, row in forced:
                force[row] = True
                force_text[row] = payloads[i].force_text
                force_audio[row] = payloads[i].force_audio
            kwargs = {"force_text": force_text, "force_audio": force_audio, "force": force}
        out = self.gen.step(codes, active, **kwargs)
        ready, text, audio = out.ready.tolist(), out.text.tolist(), out.audio.tolist()
        for i, row in zip(stepped, plan.rows):
            results[i] = StepOut(bool(ready[row]), int(text[row]), audio[row])
        return results, b

    @torch.inference_mode()
    def warm_up(self, bucket: int) -> None:
        """One step of rows `[0, bucket)` (all free at load) with default sampling, at the
        longest attention span; on CUDA the first call per bucket captures its graph."""
        from moshi_grpc.models.lm_gen import SamplingConfig

        gen = self.gen
        for row in range(bucket):
            gen.reset(row, SamplingConfig(), seed=row)
        codes = torch.zeros((bucket, self.n_user), dtype=torch.long)
        active = torch.ones(bucket, dtype=torch.bool)
        if self.graphs is not None:
            inputs = _core_inputs(codes, active, self.dep_q, gen.device)
            if bucket not in self.graphs:
                self.graphs.capture(bucket, inputs)
            self.graphs.run(bucket, inputs)
            torch.cuda.synchronize()
        elif hasattr(gen, "core"):
            shape = gen.full_shape()
            warm = type(shape)(shape.length, True, min(25, shape.k_text), min(250, shape.k_audio))
            gen.core(*_core_inputs(codes, active, self.dep_q, gen.device), shape=warm)
        else:
            gen.step(codes, active)
        for row in range(bucket):
            gen.reset(row)
            gen.free(row)


def _core_inputs(codes: torch.Tensor, active: torch.Tensor, dep_q: int, device: Any) -> tuple:
    b = codes.shape[0]
    host = (
        codes,
        active,
        torch.zeros(b, dtype=torch.bool),
        torch.zeros(b, dtype=torch.long),
        torch.zeros((b, dep_q), dtype=torch.long),
    )
    return tuple(t.to(device) for t in host)


class LmEngine:
    """One LM replica: generator + batching scheduler + text tokenizer."""

    def __init__(
        self, lm: Any, tokenizer: Any, options: LmOptions, metrics: LmMetrics | None = None
    ) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self.options = options
        cfg = lm.config
        self.dep_q = int(cfg.dep_q)
        self.n_user = int(cfg.num_user_streams)
        self.card = int(cfg.card)
        self.text_card = int(cfg.text_card)
        self.delays = [int(d) for d in cfg.delays]
        self.max_delay = max(self.delays)
        self.gen = make_generator(lm, options.max_sessions)
        graphs = use_cuda_graphs(options.cuda_graphs, getattr(lm, "device", "cpu"))
        self.runner = GenRunner(self.gen, options.max_sessions, self.n_user, self.dep_q, graphs)
        self.scheduler = BatchScheduler(
            self.runner,
            name="lm-step",
            max_wait_s=options.max_wait_ms / 1000.0,
            metrics=metrics.step if metrics else None,
            inject_delay_s=options.inject_delay_ms / 1000.0,
            idle_probe_s=options.idle_probe_s,
        )
        # Every bucket runs (and on CUDA is captured) before the replica reports SERVING.
        self.scheduler.warm_up(options.warmup_repeats)

    @property
    def model_name(self) -> str:
        return "moshi-lm-echo" if self.options.model == "echo" else "moshi-lm"

    def piece(self, token: int) -> str:
        return self.tokenizer.piece(token) if self.tokenizer is not None else ""

    def start(self) -> None:
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.close()
