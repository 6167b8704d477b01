"""The LM engine: one Moshi LM replica, its batched generator (LMGen) and a scheduler.

Each Step stream holds one slot; its state lies in a generator row, reset with the stream's
sampling parameters and seed when it joins. Live sessions stay packed into the first rows and
a tick steps only the smallest bucket of rows holding its frames (services/common/buckets.py).
Replay (failover) rebuilds a row from the recorded history in one prefill (`Prefill`, a few
batched forwards of the temporal transformer), then the last steps, whose tokens were not
emitted yet, run as ordinary steps. The runner is a `RowRunner` (services/common/runner.py):
the same slots -> rows -> bucket -> eager-or-replayed step loop as the codec's.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moshi_grpc.models.lm_gen import SamplingConfig
from moshi_grpc.services.common.batching import BatchScheduler
from moshi_grpc.services.common.buckets import TickPlan
from moshi_grpc.services.common.cuda_graphs import use_cuda_graphs
from moshi_grpc.services.common.device import exact_float32, free_memory, torch_dtype
from moshi_grpc.services.common.metrics import LmMetrics
from moshi_grpc.services.common.options import BackendOptions
from moshi_grpc.services.common.runner import RowRunner
from moshi_grpc.services.lm.prefix_cache import CacheStats, PrefixCache
from moshi_grpc.services.lm.prompts import Prefill, PrefixWork, Start, StartDone

__all__ = [
    "GenRunner",
    "JoinPayload",
    "LmEngine",
    "LmOptions",
    "Prefill",
    "Start",
    "StartDone",
    "StepInput",
    "StepOut",
    "load_lm_model",
    "make_generator",
]

log = logging.getLogger(__name__)


@dataclass
class LmOptions(BackendOptions):
    """Settings of an LM replica (the CLI flags)."""

    config: str = "small"
    tokenizer: str | None = None
    prefix_cache_mib: float = 1024.0  # persona models: prompt prefixes kept (host memory)


@dataclass(frozen=True)
class StepInput:
    """One frame for the generator: user codes, and recorded tokens when forcing."""

    user_codes: torch.Tensor  # (n_user,) long
    force_text: int | None = None
    force_audio: torch.Tensor | None = None  # (dep_q,) long


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


# What `--model` selects, by name: the `Info` model name. The option is the one place where
# the echo is told apart: `load_lm_model` loads it, `make_generator` builds its generator,
# and every other part (runner, scheduler, servicer) drives either through one contract.
MODEL_NAMES = {"real": "moshi-lm", "echo": "moshi-lm-echo"}


def load_lm_model(options: LmOptions) -> tuple[Any, Any]:
    """(lm, tokenizer-or-None) described by `options`."""
    if options.model not in MODEL_NAMES:
        raise ValueError(f"unknown LM model {options.model!r} ({' or '.join(MODEL_NAMES)})")
    if options.model == "echo":
        from moshi_grpc.services.lm.echo import EchoLM

        return EchoLM(), None
    dtype = torch_dtype(options.dtype)
    from moshi_grpc.models.cpu_fast import prepare_lm_for_cpu
    from moshi_grpc.models.lm import load_lm
    from moshi_grpc.models.text import TextTokenizer

    exact_float32(options.device, dtype)
    if torch.device(options.device).type == "cuda":
        _check_fits(options, dtype)
    lm = load_lm(
        options.weights,
        config=options.config,
        device=options.device,
        dtype=dtype,
        seed=options.seed,
    )
    prepare_lm_for_cpu(lm, options.cpu_forms)  # faster CPU kernels; nothing elsewhere
    return lm, TextTokenizer(options.tokenizer)


def _check_fits(options: LmOptions, dtype: torch.dtype) -> None:
    """Refuse, before allocating anything, an LM whose weights and slots cannot fit the
    CUDA device's free memory (a 7B in float32 with 16 slots needs ~75 GiB): seconds and
    the figures, instead of an out-of-memory error minutes into the load."""
    from moshi_grpc.models.lm import resolve_config
    from moshi_grpc.models.memory_plan import check_lm_fits

    cfg, _ = resolve_config(options.config)
    check_lm_fits(
        cfg, dtype, options.max_sessions, free_memory(options.device), what=options.device
    )


def make_generator(model: str, lm: Any, num_rows: int) -> Any:
    """The generator over `num_rows` rows of `lm`, loaded as `--model model`."""
    if model == "echo":
        from moshi_grpc.services.lm.echo import EchoLMGen

        return EchoLMGen(lm, num_rows)
    from moshi_grpc.models.lm_gen import LMGen

    return LMGen(lm, num_rows)


class GenRunner(RowRunner):
    """A generator (`LMGen`, or the echo's) as a `RowRunner`.

    The step's static shape is the generator's `CoreShape`: eagerly the tightest one for the
    tick (the whole ring, top-k widths from the rows' sampling), in graph mode the full one
    (whole vocabularies) so one graph per bucket serves every tick. A `Start` payload (a
    persona prompt, a failover replay) is prefilled on the host's schedule, in chunks after
    the tick's step (services/lm/prompts.py); it is not captured.
    """

    def __init__(
        self,
        gen: Any,
        num_rows: int,
        graphs: bool,
        cache: PrefixCache | None = None,
        model_key: str = "",
    ) -> None:
        super().__init__(num_rows, gen.device, graphs)
        self.gen = gen
        cfg = gen.lm.config
        self.n_user = int(cfg.num_user_streams)
        self.dep_q = int(cfg.dep_q)
        self.work = PrefixWork(gen, cache, model_key)
        self.step_ms: dict[int, float] = {}  # fastest warm-up step per bucket

    def reset_row(self, row: int, payload: JoinPayload) -> None:
        self.gen.reset(row, payload.sampling, payload.seed)

    def move_row(self, src: int, dst: int) -> None:
        self.gen.move_row(src, dst)

    def free_row(self, row: int) -> None:
        self.gen.free(row)

    def prepare_rows(self, bucket: int) -> None:
        for row in range(bucket):
            self.gen.reset(row, SamplingConfig(), seed=row)

    @torch.inference_mode()
    def leave(self, slot: int) -> None:
        self.work.drop(slot)
        super().leave(slot)

    @torch.inference_mode()
    def warm_up(self, bucket: int) -> float:
        """The step's time (recorded per bucket for the prefill budget); at the first bucket
        also the prefill's cost per position, on a free row."""
        seconds = super().warm_up(bucket)
        ms = seconds * 1000.0
        self.step_ms[bucket] = min(self.step_ms.get(bucket, ms), ms)
        if bucket == self.ladder[0]:
            self.prepare_rows(1)
            self.work.measure(0)
            self.free_row(0)
        return seconds

    def shape(self, plan: TickPlan, payloads: Sequence[StepInput]) -> Hashable:
        if self.graphs is not None:
            return self.gen.full_shape()
        active = torch.zeros(plan.bucket, dtype=torch.bool)
        forced = torch.zeros(plan.bucket, dtype=torch.bool)
        for p, row in zip(payloads, plan.rows):
            active[row] = True
            forced[row] = p.force_text is not None
        return self.gen.core_shape(plan.bucket, active, forced)

    def warm_shapes(self, bucket: int) -> list[Hashable]:
        if self.graphs is not None:
            return [self.gen.full_shape()]
        return [self.gen.widest_shape(SamplingConfig())]

    def inputs(
        self, plan: TickPlan, payloads: Sequence[StepInput], shape: Hashable
    ) -> tuple[torch.Tensor, ...]:
        b = plan.bucket
        codes = torch.zeros((b, self.n_user), dtype=torch.long)
        active = torch.zeros(b, dtype=torch.bool)
        force = torch.zeros(b, dtype=torch.bool)
        force_text = torch.zeros(b, dtype=torch.long)
        force_audio = torch.zeros((b, self.dep_q), dtype=torch.long)
        for p, row in zip(payloads, plan.rows):
            codes[row] = p.user_codes
            active[row] = True
            if p.force_text is not None:
                force[row] = True
                force_text[row] = p.force_text
                force_audio[row] = p.force_audio
        return codes, active, force, force_text, force_audio

    def example_inputs(self, bucket: int, shape: Hashable) -> tuple[torch.Tensor, ...]:
        return (
            torch.zeros((bucket, self.n_user), dtype=torch.long),
            torch.ones(bucket, dtype=torch.bool),
            torch.zeros(bucket, dtype=torch.bool),
            torch.zeros(bucket, dtype=torch.long),
            torch.zeros((bucket, self.dep_q), dtype=torch.long),
        )

    def step(self, shape: Hashable, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.gen.core(*inputs, shape=shape)

    def results(
        self, plan: TickPlan, outputs: tuple[torch.Tensor, ...], payloads: Sequence[StepInput]
    ) -> list[StepOut]:
        text, audio, ready = (t.cpu() for t in outputs[:3])
        self.gen.advance(plan.rows)
        ready, text, audio = ready.tolist(), text.tolist(), audio.tolist()
        return [StepOut(bool(ready[r]), int(text[r]), audio[r]) for r in plan.rows]

    @torch.inference_mode()
    def run(
        self, slots: Sequence[int], payloads: Sequence[StepInput | Start]
    ) -> tuple[list[Any], int]:
        """The live rows' step first (their frames are due), then the sessions' `Start`s
        (prompts, replays) in the prefill budget this tick leaves."""
        results: list[Any] = [NOT_READY_OUT] * len(slots)
        stepped = [i for i, p in enumerate(payloads) if not isinstance(p, Start)]
        bucket = 0
        if stepped:
            outs, bucket = super().run([slots[i] for i in stepped], [payloads[i] for i in stepped])
            for i, out in zip(stepped, outs):
                results[i] = out
        starts = {slots[i]: i for i, p in enumerate(payloads) if isinstance(p, Start)}
        budget = self.work.budget(self.step_ms.get(bucket))  # (none measured: no limit)
        for slot in self.work.order(list(starts)):
            i = starts[slot]
            results[i], used = self.work.advance(slot, self.table.row_of(slot), payloads[i], budget)
            budget = max(0, budget - used)
        return results, bucket


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
        self.gen = make_generator(options.model, lm, options.max_sessions)
        graphs = use_cuda_graphs(options.cuda_graphs, lm.device)
        # A persona model (PersonaPlex) starts every session with a prompt; its prefixes
        # are cached (services/lm/prefix_cache.py).
        self.persona = bool(getattr(cfg, "persona", False))
        self.prefix_cache = (
            PrefixCache(int(options.prefix_cache_mib * 2**20)) if self.persona else None
        )
        model_key = f"{options.model}/{options.config}/{options.weights}/{options.dtype}"
        self.runner = GenRunner(
            self.gen, options.max_sessions, graphs, self.prefix_cache, model_key
        )
        if metrics is not None:  # (zeros on a model without prompts: every series exists)
            metrics.watch_prefix_cache(
                self.prefix_cache.stats if self.prefix_cache is not None else CacheStats
            )
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
        return MODEL_NAMES[self.options.model]

    def piece(self, token: int) -> str:
        return self.tokenizer.piece(token) if self.tokenizer is not None else ""

    def start(self) -> None:
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.close()
