"""Zero-cost stand-in for the Moshi LM and its generator (`--model echo`).

Same interface as `moshi_grpc.models.lm_gen.LMGen`: per-slot reset with sampling params and
seed, batched `step(user_codes, active)`. Moshi's codes at step t are the user's codes of
step t - max_delay (an echo with the model's delay), the text token is padding, and the
first max_delay steps of a slot are not ready — the same delay semantics as the real model.
Per-slot state (a step counter and a small history ring) makes slot mix-ups visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class EchoLMConfig:
    dep_q: int = 8
    n_q: int = 16
    card: int = 2048
    text_card: int = 32000
    text_padding_id: int = 3
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def num_user_streams(self) -> int:
        return self.n_q - self.dep_q


class EchoLM:
    config_name = "echo"

    def __init__(self, config: EchoLMConfig | None = None) -> None:
        self.config = config or EchoLMConfig()
        self.device = torch.device("cpu")
        self.dtype = torch.float32


@dataclass
class EchoStepOutput:
    text: torch.Tensor  # (N,) long
    audio: torch.Tensor  # (N, dep_q) long
    ready: torch.Tensor  # (N,) bool


class EchoLMGen:
    """Rows `[0, B)` per step, like `LMGen` (see its docstring for the row protocol)."""

    def __init__(self, lm: EchoLM, num_rows: int) -> None:
        cfg = lm.config
        self.lm = lm
        self.num_slots = num_rows
        self.max_delay = cfg.max_delay
        self._steps = torch.zeros(num_rows, dtype=torch.long)
        self._history = torch.zeros(num_rows, cfg.max_delay + 1, cfg.dep_q, dtype=torch.long)
        self.captured = None

    def reset(self, row: int, sampling: Any = None, seed: int | None = None) -> None:
        self._steps[row] = 0
        self._history[row] = 0

    def free(self, row: int) -> None:
        pass

    def move_row(self, src: int, dst: int) -> None:
        self._steps[dst] = self._steps[src]
        self._history[dst] = self._history[src]

    def prefill(self, row: int, user_codes: torch.Tensor, text: Any, audio: Any) -> None:
        """The history's user codes are all the echo needs: its last steps fill the ring."""
        ring = self.max_delay + 1
        total = int(user_codes.shape[0])
        for s in range(max(0, total - ring), total):
            self._history[row, s % ring] = user_codes[s, : self._history.shape[-1]]
        self._steps[row] = total

    def step(
        self,
        user_codes: torch.Tensor,
        active: torch.Tensor | None = None,
        force_text: torch.Tensor | None = None,
        force_audio: torch.Tensor | None = None,
        force: torch.Tensor | None = None,
    ) -> EchoStepOutput:
        """Forced tokens (replay) are ignored: the echo's output depends on user codes only."""
        n = user_codes.shape[0]
        if active is None:
            active = torch.ones(n, dtype=torch.bool)
        ring = self.max_delay + 1
        steps, history = self._steps[:n], self._history[:n]
        pos = steps % ring
        rows = torch.arange(n)
        written = history.clone()
        written[rows, pos] = user_codes.long()
        history.copy_(torch.where(active.view(-1, 1, 1), written, history))
        out_pos = (steps - self.max_delay) % ring
        audio = history[rows, out_pos].clone()
        ready = active & (steps >= self.max_delay)
        steps.copy_(torch.where(active, steps + 1, steps))
        text = torch.full((n,), self.lm.config.text_padding_id, dtype=torch.long)
        return EchoStepOutput(text=text, audio=audio, ready=ready)
