"""Batched streaming generation for the Moshi LM: fixed slots, one call steps them all.

Every piece of streaming state has the slot as its first dimension: the step counter, the
ring KV cache rows, the small ring of delayed tokens, the sampling parameters and the random
generator. A step runs only the active slots (gathered into one batch), so an idle slot costs
no compute and its state is left exactly as it was; a slot's output depends only on its own
inputs, parameters and seed, never on who else shares the batch.

Token timing (acoustic delays). At step t a slot first stores the user's codes of step t for
user stream k at ring position t + delay_k, then reads every stream at position t (streams
whose delay is not yet elapsed read their initial token), runs the model, and stores the text
token and Moshi's audio codes it sampled at position t + 1. Output for step t (the "ready"
frame) is read back aligned by the delays, so it only exists once t >= max_delay.

Failover replay: `step(..., force=...)` replaces a slot's sampled tokens by recorded ones
(`StepResult.sampled_text` / `sampled_audio` of the original run). Replaying a session's user
codes and sampled tokens onto a slot reset with the same seed and sampling parameters rebuilds
its KV cache, token ring, step counter and random-generator state.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from moshi_grpc.models.lm import LMModel, half_gemv

__all__ = ["LMGen", "SamplingConfig", "StepResult", "LMGenError"]

UNGENERATED = -2  # token ring filler, never fed to the model
NOT_READY = -1  # value of StepResult tokens that do not exist (yet)


class LMGenError(ValueError):
    """Bad input to the generator: wrong shapes, codes out of range, unknown slot."""


@dataclass(frozen=True)
class SamplingConfig:
    """Per-session sampling; temperature 0 means greedy, top_k 0 means the whole vocabulary."""

    text_temperature: float = 0.7
    text_top_k: int = 25
    audio_temperature: float = 0.8
    audio_top_k: int = 250

    def __post_init__(self) -> None:
        for name in ("text_temperature", "audio_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LMGenError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise LMGenError(f"{name} must be finite and >= 0, got {value!r}")
        for name in ("text_top_k", "audio_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LMGenError(f"{name} must be an integer >= 0, got {value!r}")

    @classmethod
    def greedy(cls) -> SamplingConfig:
        return cls(0.0, 0, 0.0, 0)


@dataclass
class StepResult:
    """Outputs of one `LMGen.step` for every slot (`NOT_READY` = -1 where there is none).

    `text`, `audio`: the delay-aligned frame (text token and Moshi's dep_q codes) - what a
    client consumes; `ready` says which slots have one. `sampled_text`, `sampled_audio`: the raw
    tokens sampled this step (before delay alignment), the history to record for replay.
    `steps`: each slot's step counter after the call.
    """

    text: torch.Tensor  # (N,)
    audio: torch.Tensor  # (N, dep_q)
    ready: torch.Tensor  # (N,) bool
    sampled_text: torch.Tensor  # (N,)
    sampled_audio: torch.Tensor  # (N, dep_q)
    steps: torch.Tensor  # (N,)


@dataclass
class _DrawPlan:
    """The sampled rows of one batch: row indices (None = all), generators, temperatures
    `[S, 1]` and top-k draws per row."""

    rows: torch.Tensor | None
    generators: list[torch.Generator]
    temps: torch.Tensor
    ks: list[int]
    kmax: int


def _draws(top_k: int, vocab: int) -> int:
    return vocab if top_k <= 0 or top_k > vocab else top_k


class LMGen:
    """Streaming generator over `num_slots` independent sessions of one `LMModel`."""

    def __init__(self, lm: LMModel, num_slots: int) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots <= 0:
            raise LMGenError(f"num_slots must be a positive integer, got {num_slots!r}")
        cfg = lm.config
        self.lm = lm
        self.num_slots = num_slots
        self.max_delay = cfg.max_delay
        dev = lm.device
        self.device = dev
        n, k = num_slots, cfg.num_codebooks
        self.ring = cfg.max_delay + 2  # token ring length: reads lag writes by <= max_delay + 1
        self.caches = lm.new_kv_caches(num_slots)
        self.dep_scratch = lm.new_depformer_scratch(num_slots)
        self.steps = torch.zeros(n, dtype=torch.long, device=dev)
        self.tokens = torch.full((n, k, self.ring), UNGENERATED, dtype=torch.long, device=dev)
        self.delays = torch.tensor(cfg.delays, dtype=torch.long, device=dev)
        self.initial = torch.tensor(
            [cfg.text_card] + [cfg.card] * cfg.n_q, dtype=torch.long, device=dev
        )
        self.user_streams = torch.arange(cfg.dep_q + 1, k, device=dev)
        # Per-step index constants, made once.
        self._user_delays = self.delays[self.user_streams][None, :]  # (1, U)
        self._gen_streams = torch.arange(1, cfg.dep_q + 1, device=dev)[None, :]  # (1, dep_q)
        self._out_streams = torch.arange(cfg.dep_q + 1, device=dev)  # text + Moshi's audio
        self._out_delays = self.delays[None, : cfg.dep_q + 1] - self.max_delay
        self.in_use = torch.zeros(n, dtype=torch.bool)
        self.sampling: list[SamplingConfig] = [SamplingConfig.greedy()] * n
        self.seeds: list[int | None] = [None] * n
        self.generators: list[torch.Generator | None] = [None] * n
        # Batch-1 steps of a half-precision CPU model take PyTorch's GEMV (see lm.half_gemv).
        self.half_gemv = dev.type == "cpu" and lm.dtype in (torch.bfloat16, torch.float16)

    # ---- slot management -----------------------------------------------------------------
    def _check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise LMGenError(f"slot must be an integer in [0, {self.num_slots}), got {slot!r}")
        return slot

    def reset(self, slot: int, sampling: SamplingConfig | None = None, seed: int | None = None):
        """Start a new session in `slot`; the other slots are not touched."""
        slot = self._check_slot(slot)
        sampling = sampling or SamplingConfig()
        if not isinstance(sampling, SamplingConfig):
            raise LMGenError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)  # global RNG untouched
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise LMGenError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.steps[slot] = 0
        self.tokens[slot] = UNGENERATED
        self.in_use[slot] = True
        self.sampling[slot] = sampling
        self.seeds[slot] = seed
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self.generators[slot] = gen
        # The ring KV cache needs no clearing: a slot attends only to entries it wrote.

    def free(self, slot: int) -> None:
        """Mark `slot` unused (its session ended); it must be reset before stepping again."""
        self.in_use[self._check_slot(slot)] = False

    def seed_of(self, slot: int) -> int | None:
        """The seed a slot's session runs with (the drawn one when reset got None)."""
        return self.seeds[self._check_slot(slot)]

    # ---- validation ----------------------------------------------------------------------
    def _as_long(self, name: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise LMGenError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise LMGenError(f"{name} must hold integers, got {value.dtype}")
        if tuple(value.shape) != shape:
            raise LMGenError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
        return value.to(device=self.device, dtype=torch.long)

    def _as_mask(self, name: str, value: torch.Tensor | None) -> torch.Tensor | None:
        if value is None:
            return None
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
            raise LMGenError(f"{name} must be a bool tensor")
        if tuple(value.shape) != (self.num_slots,):
            raise LMGenError(f"{name} must have shape [{self.num_slots}], got {list(value.shape)}")
        return value.cpu()

    @staticmethod
    def _check_range(name: str, values: torch.Tensor, rows: torch.Tensor, high: int) -> None:
        picked = values[rows]
        if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= high):
            bad = rows[((picked < 0) | (picked >= high)).view(len(rows), -1).any(1)].tolist()
            raise LMGenError(f"{name} out of range [0, {high}) for slot(s) {bad}")

    # ---- sampling ------------------------------------------------------------------------
    def _draw_plan(self, slots: list[int], text: bool, vocab: int) -> _DrawPlan | None:
        """Which rows of a batch over `slots` sample (and how); None when all are greedy.

        Built once per step for the text token and once for all dep_q audio codebooks.
        """
        picked = []
        for j, slot in enumerate(slots):
            sc = self.sampling[slot]
            temp = sc.text_temperature if text else sc.audio_temperature
            if temp > 0:
                k = _draws(sc.text_top_k if text else sc.audio_top_k, vocab)
                picked.append((j, self.generators[slot], temp, k))
        if not picked:
            return None
        ks = [p[3] for p in picked]
        every = len(picked) == len(slots)
        return _DrawPlan(
            rows=None if every else torch.tensor([p[0] for p in picked], device=self.device),
            generators=[p[1] for p in picked],
            temps=torch.tensor([[p[2]] for p in picked], device=self.device),
            ks=ks,
            kmax=max(ks),
        )

    @staticmethod
    def _sample(logits: torch.Tensor, plan: _DrawPlan | None) -> torch.Tensor:
        """One token per row of `logits [B, V]` (float32), each row with its own parameters.

        Greedy rows take the argmax. Sampled rows draw exactly top_k exponentials from their
        own generator (the exponential race: argmax p / q is a sample from p), so the number
        of draws, and thus the generator state, never depends on the other rows.
        """
        if plan is None:
            return logits.argmax(-1)
        x = logits if plan.rows is None else logits[plan.rows]
        vals, ids = (x / plan.temps).topk(plan.kmax, dim=-1)  # (S, kmax), descending
        q = torch.empty_like(vals)
        for i, (gen, k) in enumerate(zip(plan.generators, plan.ks)):
            if k < plan.kmax:
                vals[i, k:] = -math.inf
                q[i, k:] = math.inf
            q[i, :k].exponential_(generator=gen)
        # argmax(p / q) needs p only up to a per-row factor: exp(v - max) is enough.
        choice = (torch.exp(vals - vals[:, :1]) / q).argmax(-1, keepdim=True)
        picked = ids.gather(-1, choice)[:, 0]
        if plan.rows is None:
            return picked
        out = logits.argmax(-1)
        out[plan.rows] = picked
        return out

    def _burn_audio_draws(self, slot: int) -> None:
        """Advance a forced slot's generator as if it had sampled its audio codebooks."""
        sc = self.sampling[slot]
        if sc.audio_temperature > 0:
            k = _draws(sc.audio_top_k, self.lm.config.card)
            for _ in range(self.lm.config.dep_q):
                torch.empty(k, device=self.device).exponential_(generator=self.generators[slot])

    # ---- the step ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(
        self,
        user_codes: torch.Tensor,
        active: torch.Tensor | None = None,
        *,
        force_text: torch.Tensor | None = None,
        force_audio: torch.Tensor | None = None,
        force: torch.Tensor | None = None,
    ) -> StepResult:
        """Advance every active slot by one 80 ms step in one batched model call.

        `user_codes [N, n_q - dep_q]`: the user's audio codes for this step (rows of inactive
        slots are ignored). `active [N]` (default: every slot in use). Where `force[i]`, slot
        i's sampled tokens are replaced by `force_text[i]` / `force_audio[i]` (replay).
        """
        cfg = self.lm.config
        n = self.num_slots
        codes = self._as_long("user_codes", user_codes, (n, cfg.num_user_streams))
        act = self._as_mask("active", active)
        act = self.in_use.clone() if act is None else act
        not_reset = (act & ~self.in_use).nonzero()[:, 0].tolist()
        if not_reset:
            raise LMGenError(f"slot(s) {not_reset} are active but were never reset")
        forced = self._as_mask("force", force)
        f_text = f_audio = None
        if forced is not None:
            if force_text is None or force_audio is None:
                raise LMGenError("force needs both force_text and force_audio")
            if (forced & ~act).any():
                raise LMGenError("force is set for inactive slot(s)")
            f_text = self._as_long("force_text", force_text, (n,))
            f_audio = self._as_long("force_audio", force_audio, (n, cfg.dep_q))
        elif force_text is not None or force_audio is not None:
            raise LMGenError("force_text/force_audio given without force")

        slots = act.nonzero()[:, 0]
        result = self._empty_result()
        if slots.numel() == 0:
            return result
        slot_list = slots.tolist()
        rows = slots.to(self.device)
        self._check_range("user_codes", codes, rows, cfg.card)
        if forced is not None:
            frows = forced.nonzero()[:, 0].to(self.device)
            self._check_range("force_text", f_text, frows, cfg.text_card)
            self._check_range("force_audio", f_audio, frows, cfg.card)

        with half_gemv(self.half_gemv and len(slot_list) == 1):
            return self._advance(rows, slots, slot_list, codes, forced, f_text, f_audio, result)

    def _advance(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        slot_list: list[int],
        codes: torch.Tensor,
        forced: torch.Tensor | None,
        f_text: torch.Tensor | None,
        f_audio: torch.Tensor | None,
        result: StepResult,
    ) -> StepResult:
        """The model part of `step` for the (validated) active rows."""
        cfg = self.lm.config
        n = self.num_slots
        t = self.steps[rows]  # (B,)
        # 1. store the user's codes at t + delay.
        us = self.user_streams
        pos = (t[:, None] + self._user_delays) % self.ring  # (B, U)
        self.tokens[rows[:, None], us[None, :], pos] = codes[rows]
        # 2. read this step's input tokens.
        inp = self.tokens[rows, :, t % self.ring]  # (B, K)
        is_init = t[:, None] <= self.delays[None, :]
        inp = torch.where(is_init, self.initial[None, :], inp)
        # 3. temporal transformer + text token.
        plan = self.lm.plan_step(rows, t, n)
        hidden, text_logits = self.lm.temporal_step(inp, self.caches, plan)
        text = self._sample(text_logits.float(), self._draw_plan(slot_list, True, cfg.text_card))
        audio = torch.empty(len(slot_list), cfg.dep_q, dtype=torch.long, device=self.device)
        # 4. depformer for the slots that are not replaying recorded tokens.
        if forced is not None:
            is_forced = forced[slots].tolist()
            text = torch.where(forced[slots].to(self.device), f_text[rows], text)
            audio[:] = f_audio[rows]
            for slot, f in zip(slot_list, is_forced):
                if f:
                    self._burn_audio_draws(slot)
            sub = [j for j, f in enumerate(is_forced) if not f]
        else:
            sub = list(range(len(slot_list)))
        if sub:
            sub_idx = None if len(sub) == len(slot_list) else torch.tensor(sub, device=self.device)
            h = hidden if sub_idx is None else hidden[sub_idx]
            prev = text if sub_idx is None else text[sub_idx]
            sub_slots = [slot_list[j] for j in sub]
            audio_sub = self._depformer(h, prev, sub_slots)
            if sub_idx is None:
                audio = audio_sub
            else:
                audio[sub_idx] = audio_sub
        # 5. store the sampled tokens at t + 1 and advance the slots.
        t1 = t + 1
        self.tokens[rows, 0, t1 % self.ring] = text
        self.tokens[rows[:, None], self._gen_streams, (t1 % self.ring)[:, None]] = audio
        self.steps[rows] = t1
        # 6. the delay-aligned frame of each ready slot.
        ready = t1 > self.max_delay
        idx = (t1[:, None] + self._out_delays) % self.ring
        frame = self.tokens[rows[:, None], self._out_streams, idx]
        frame = torch.where(ready[:, None], frame, torch.full_like(frame, NOT_READY))
        result.text[slots] = frame[:, 0].cpu()
        result.audio[slots] = frame[:, 1:].cpu()
        result.ready[slots] = ready.cpu()
        result.sampled_text[slots] = text.cpu()
        result.sampled_audio[slots] = audio.cpu()
        result.steps[:] = self.steps.cpu()
        return result

    def _depformer(
        self, hidden: torch.Tensor, text: torch.Tensor, slots: list[int]
    ) -> torch.Tensor:
        """Moshi's dep_q codes for each row, sampled codebook after codebook."""
        lm = self.lm
        b = hidden.shape[0]
        dep_in = lm.depformer_inputs(hidden)  # (B, dep_q, d)
        scratch = self.dep_scratch.views(b)
        plan = self._draw_plan(slots, False, lm.config.card)
        prev = text
        out = []
        for step in range(lm.config.dep_q):
            logits = lm.depformer_step(step, dep_in, prev, scratch[step])
            prev = self._sample(logits.float(), plan)
            out.append(prev)
        return torch.stack(out, dim=1)

    def _empty_result(self) -> StepResult:
        n, q = self.num_slots, self.lm.config.dep_q
        return StepResult(
            text=torch.full((n,), NOT_READY, dtype=torch.long),
            audio=torch.full((n, q), NOT_READY, dtype=torch.long),
            ready=torch.zeros(n, dtype=torch.bool),
            sampled_text=torch.full((n,), NOT_READY, dtype=torch.long),
            sampled_audio=torch.full((n, q), NOT_READY, dtype=torch.long),
            steps=self.steps.cpu().clone(),
        )
