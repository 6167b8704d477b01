"""Zero-cost stand-in for the Moshi LM and its generator (`--model echo`).

Same contract as `moshi_grpc.models.lm_gen.LMGen` (see `EchoLMGen`): per-row reset, batched
steps of rows [0, B). Moshi's codes at step t are the user's codes of
step t - max_delay (an echo with the model's delay), the text token is padding, and the
first max_delay steps of a row are not ready — the same delay semantics as the real model.
Per-row state (a step counter and a small history ring) makes slot mix-ups visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moshi_grpc.models.lm_gen import Prefix, StreamLayout


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


class EchoLMGen:
    """Rows `[0, B)` per step, with the generator contract of `LMGen` that the engine's
    runner uses (`reset`, `free`, `move_row`, `core`, `core_shape`, `full_shape`,
    `widest_shape`, `advance`, and the prefix API `replay_plan`, `prefill_columns`,
    `finish`): the runner does not tell the two apart. It takes no persona."""

    def __init__(self, lm: EchoLM, num_rows: int) -> None:
        cfg = lm.config
        self.lm = lm
        self.num_rows = num_rows
        self.device = lm.device
        self.layout = StreamLayout.of(cfg)
        self.max_delay = cfg.max_delay
        self._steps = torch.zeros(num_rows, dtype=torch.long)
        self._history = torch.zeros(num_rows, cfg.max_delay + 1, cfg.dep_q, dtype=torch.long)
        self._rows = torch.arange(num_rows)

    def reset(self, row: int, sampling: Any = None, seed: int | None = None) -> None:
        self._steps[row] = 0
        self._history[row] = 0

    def free(self, row: int) -> None:
        """Stateless between sessions: a reset clears everything."""

    def move_row(self, src: int, dst: int) -> None:
        self._steps[dst] = self._steps[src]
        self._history[dst] = self._history[src]

    # A replayed history (failover), as `LMGen`'s prefix API: its user codes are all the
    # echo needs (in the columns' user streams); the last ones fill the history ring.
    def fresh_ring(self) -> torch.Tensor:
        return torch.zeros((self.layout.num_streams, self.max_delay + 2), dtype=torch.long)

    def replay_plan(
        self, user_codes: torch.Tensor, text: Any, audio: Any, after: Any = None
    ) -> Prefix:
        g = self.layout.generated
        columns = torch.zeros((user_codes.shape[0], self.layout.num_streams), dtype=torch.long)
        columns[:, g:] = user_codes
        none = torch.zeros(g, dtype=torch.bool)
        return Prefix(columns, self.fresh_ring(), none, torch.zeros(g, dtype=torch.long))

    def prefill_columns(self, row: int, columns: torch.Tensor, start: int, chunk: int = 0) -> None:
        ring = self.max_delay + 1
        g = self.layout.generated
        for i in range(max(0, columns.shape[0] - ring), columns.shape[0]):
            self._history[row, (start + i) % ring] = columns[i, g : g + self._history.shape[-1]]
        self._steps[row] = start + columns.shape[0]

    def finish(self, row: int, prefix: Prefix) -> None:
        """Nothing beyond the history ring."""

    # The echo has no attention span or sampling: one static shape serves every step.
    def core_shape(self, b: int, active: torch.Tensor, forced: torch.Tensor) -> str:
        return "echo"

    def full_shape(self) -> str:
        return "echo"

    def widest_shape(self, sampling: Any) -> str:
        return "echo"

    def advance(self, rows: Any) -> None:
        """No host mirror: the step counters live in `_steps`."""

    def core(
        self,
        codes: torch.Tensor,
        active: torch.Tensor,
        forced: torch.Tensor,
        f_text: torch.Tensor,
        f_audio: torch.Tensor,
        *,
        shape: str,
    ) -> tuple[torch.Tensor, ...]:
        """Forced tokens (replay) are ignored: the echo's output depends on user codes only.
        Returns (text, audio, ready, sampled text, sampled audio, steps) like `LMGen.core`."""
        n = codes.shape[0]
        ring = self.max_delay + 1
        steps, history = self._steps[:n], self._history[:n]
        rows = self._rows[:n]
        written = history.clone()
        written[rows, steps % ring] = codes.long()
        history.copy_(torch.where(active.view(-1, 1, 1), written, history))
        audio = history[rows, (steps - self.max_delay) % ring].clone()
        ready = active & (steps >= self.max_delay)
        steps.copy_(torch.where(active, steps + 1, steps))
        text = torch.full((n,), self.lm.config.text_padding_id, dtype=torch.long)
        return text, audio, ready, text, audio, steps.clone()
