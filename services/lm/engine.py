"""The LM engine: one Moshi LM replica, its batched generator (LMGen) and a scheduler.

Each Step stream holds one generator slot, reset with the stream's sampling parameters and
seed when it joins. Replay (failover) feeds the recorded history through the same
scheduler as teacher-forced steps, so it is batched with the live sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moshi_grpc.services.common.batching import BatchScheduler
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
    max_sessions: int = 16
    max_wait_ms: float = 5.0
    inject_delay_ms: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class StepInput:
    """One frame for the generator: user codes, and recorded tokens when replaying."""

    user_codes: torch.Tensor  # (n_user,) long
    force_text: int | None = None
    force_audio: torch.Tensor | None = None  # (dep_q,) long


@dataclass(frozen=True)
class StepOut:
    ready: bool
    text: int
    audio: list[int]


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
    from moshi_grpc.models.lm import load_lm
    from moshi_grpc.models.text import TextTokenizer

    lm = load_lm(
        options.weights,
        config=options.config,
        device=options.device,
        dtype=DTYPES[options.dtype],
        seed=options.seed,
    )
    return lm, TextTokenizer(options.tokenizer)


def make_generator(lm: Any, num_slots: int) -> Any:
    if getattr(lm, "config_name", "") == "echo":
        from moshi_grpc.services.lm.echo import EchoLMGen

        return EchoLMGen(lm, num_slots)
    from moshi_grpc.models.lm_gen import LMGen

    return LMGen(lm, num_slots)


class GenRunner:
    """Adapts LMGen to the scheduler's BatchRunner protocol."""

    def __init__(self, gen: Any, num_slots: int, n_user: int, dep_q: int) -> None:
        self.gen = gen
        self.num_slots = num_slots
        self.n_user = n_user
        self.dep_q = dep_q

    @torch.inference_mode()
    def join(self, slot: int, payload: JoinPayload) -> None:
        self.gen.reset(slot, payload.sampling, payload.seed)

    @torch.inference_mode()
    def run(self, slots: Sequence[int], payloads: Sequence[StepInput]) -> list[StepOut]:
        n = self.num_slots
        index = torch.tensor(list(slots), dtype=torch.long)
        codes = torch.zeros((n, self.n_user), dtype=torch.long)
        codes[index] = torch.stack([p.user_codes for p in payloads])
        active = torch.zeros(n, dtype=torch.bool)
        active[index] = True
        kwargs: dict[str, Any] = {}
        forced = [i for i, p in enumerate(payloads) if p.force_text is not None]
        if forced:
            force = torch.zeros(n, dtype=torch.bool)
            force_text = torch.zeros(n, dtype=torch.long)
            force_audio = torch.zeros((n, self.dep_q), dtype=torch.long)
            for i in forced:
                slot = slots[i]
                force[slot] = True
                force_text[slot] = payloads[i].force_text
                force_audio[slot] = payloads[i].force_audio
            kwargs = {"force_text": force_text, "force_audio": force_audio, "force": force}
        out = self.gen.step(codes, active, **kwargs)
        ready = out.ready[index].tolist()
        text = out.text[index].tolist()
        audio = out.audio[index].tolist()
        return [StepOut(bool(r), int(t), a) for r, t, a in zip(ready, text, audio)]


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
        self.scheduler = BatchScheduler(
            GenRunner(self.gen, options.max_sessions, self.n_user, self.dep_q),
            name="lm-step",
            max_wait_s=options.max_wait_ms / 1000.0,
            metrics=metrics.step if metrics else None,
            inject_delay_s=options.inject_delay_ms / 1000.0,
        )

    @property
    def model_name(self) -> str:
        return "moshi-lm-echo" if self.options.model == "echo" else "moshi-lm"

    @property
    def supports_replay(self) -> bool:
        return True

    def piece(self, token: int) -> str:
        return self.tokenizer.piece(token) if self.tokenizer is not None else ""

    def start(self) -> None:
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.close()
