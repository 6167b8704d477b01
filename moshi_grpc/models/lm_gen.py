"""Batched streaming generation for the Moshi LM: per-row state, one call steps rows [0, B).

Every piece of streaming state has the row as its first dimension: the step counter, the ring
KV cache, the small ring of delayed tokens, the sampling parameters and the seed. `step`
advances rows `[0, B)` for any B up to `num_rows` (the serving engine keeps its live sessions
packed into a prefix and picks B from a ladder of buckets); rows whose `active` flag is False
keep their state exactly. A row's output depends only on its own inputs, parameters and seed,
never on B or on who else shares the batch.

The step core has static shapes for a given B and never reads the device from the host (no
`.item()`, `.tolist()`, `nonzero`, branches on tensor values, CPU generators): sampling
parameters live in device tensors, and randomness is a counter-based hash of (seed, step,
stream, rank), so the core can be captured in a CUDA graph (`services/lm/engine.py` replays
it). The host keeps a mirror of each row's step counter (a Python int) for the attention span
of an eager step; `None` there means the row holds no session.

Token timing (acoustic delays). At step t a row first stores the user's codes of step t for
user stream k at ring position t + delay_k, then reads every stream at position t (streams
whose delay is not yet elapsed read their initial token), runs the model, and stores the text
token and Moshi's audio codes it sampled at position t + 1. Output for step t (the "ready"
frame) is read back aligned by the delays, so it only exists once t >= max_delay.

Failover replay: `prefill` rebuilds a row from a recorded history (user codes and the tokens
the session sampled) in a few batched forwards of the temporal transformer. Because draws are
a function of (seed, step), a replayed row then samples exactly what the original would have.
`step(..., force=...)` replaces sampled tokens by given ones step by step (the slow path).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from moshi_grpc.models.lm import LMModel

__all__ = ["LMGen", "LMGenError", "Prefix", "SamplingConfig", "StepResult", "StreamLayout"]

UNGENERATED = -2  # token ring filler, never fed to the model
NOT_READY = -1  # value of StepResult tokens that do not exist (yet)
_M32 = 0xFFFFFFFF


class LMGenError(ValueError):
    """Bad input to the generator: wrong shapes, codes out of range, unknown row."""


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
    """Outputs of one `LMGen.step` for rows `[0, B)` (`NOT_READY` = -1 where there is none).

    `text`, `audio`: the delay-aligned frame (text token and Moshi's dep_q codes) - what a
    client consumes; `ready` says which rows have one. `sampled_text`, `sampled_audio`: the raw
    tokens sampled this step (before delay alignment), the history to record for replay.
    `steps`: each row's step counter after the call.
    """

    text: torch.Tensor  # (B,)
    audio: torch.Tensor  # (B, dep_q)
    ready: torch.Tensor  # (B,) bool
    sampled_text: torch.Tensor  # (B,)
    sampled_audio: torch.Tensor  # (B, dep_q)
    steps: torch.Tensor  # (B,)


@dataclass(frozen=True)
class Prefix:
    """What a row holds after a teacher-forced prefix of P steps, before it steps live:
    the columns its steps read (the temporal transformer's inputs, `[P, K]`), its token
    ring after them (`[K, R]`), the tokens of step P's target already fixed (`pending`,
    `pending_tokens`, per generated stream) and, for a lagging generator, the user codes
    step P takes. A function of the prefix's tokens only: `persona.py` and `replay_plan`
    build them, `LMGen.load` (or `prefill_columns` + `finish`) puts one into a row."""

    columns: torch.Tensor
    ring: torch.Tensor
    pending: torch.Tensor
    pending_tokens: torch.Tensor
    user_prev: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return int(self.columns.shape[0])


@dataclass(frozen=True)
class CoreShape:
    """The Python values a step core is specialised on (one CUDA graph per distinct value).

    `length`: ring entries attended; `masked`: some row holds fewer; `k_text`, `k_audio`:
    candidates kept per sampled row (0: every row is greedy, no draws at all); `depformer`:
    False when every stepped row is forced (replaying recorded tokens needs no depformer)."""

    length: int
    masked: bool
    k_text: int
    k_audio: int
    depformer: bool = True


# The step core's tensors, in order: user codes (B, U), active (B,), force (B,),
# forced text (B,), forced audio (B, dep_q). Outputs: text, audio, ready, sampled text,
# sampled audio, steps (all (B, ...) on the device).
CoreInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StreamLayout:
    """The 1 + n_q token streams of a step and their acoustic delays: the one home of the
    delay arithmetic (the step core, the prefill and the failover replay planner read it).

    Stream 0 is the text, streams 1..dep_q Moshi's audio codebooks (both sampled by the
    model: the *generated* streams), the rest the user's codebooks. The token a row samples
    for generated stream j at step s is read back by step s + 1 (as input), and emitted to
    the client, delay-aligned, by step s + max_delay - delay_j. User codes of step s are
    read by step s + delay_j. A step t <= delay_j reads stream j's initial token instead.
    """

    delays: tuple[int, ...]
    dep_q: int

    @classmethod
    def of(cls, config: object) -> StreamLayout:
        """From any config with `delays` and `dep_q` (the LM's or the echo's)."""
        return cls(tuple(int(d) for d in config.delays), int(config.dep_q))

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def generated(self) -> int:
        """Streams the model samples: text + Moshi's dep_q codebooks."""
        return self.dep_q + 1

    @property
    def num_streams(self) -> int:
        return len(self.delays)

    def simulate(
        self,
        ring: torch.Tensor,
        start: int,
        user: torch.Tensor,
        sampled: torch.Tensor,
        initial: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps `start .. start + T - 1` of one row's token ring, on the host, written and
        read exactly as the step core does: each step stores its user codes `user [T, U]`
        at its step + delay, reads its input column (a stream whose delay has not elapsed
        reads `initial [K]`), then stores what it sampled, `sampled [T, generated]`, at its
        step + 1. Returns the columns the steps read `[T, K]` (what a prefill feeds the
        temporal transformer) and the ring after them `ring [K, R]` (a copy).

        The one place, beside the core, where a stream's delay decides where a token goes:
        a failover replay and a persona prompt are both written through it."""
        ring = ring.to("cpu", torch.long).numpy().copy()
        user = user.to("cpu", torch.long).numpy()
        sampled = sampled.to("cpu", torch.long).numpy()
        initial = initial.to("cpu", torch.long).numpy()
        delays = self.delays
        g, k, r = self.generated, self.num_streams, ring.shape[1]
        columns = np.empty((user.shape[0], k), dtype=np.int64)
        for i in range(user.shape[0]):
            t = start + i
            for stream in range(g, k):
                ring[stream, (t + delays[stream]) % r] = user[i, stream - g]
            col = ring[:, t % r].copy()
            for stream in range(k):
                if t <= delays[stream]:
                    col[stream] = initial[stream]
            columns[i] = col
            ring[:g, (t + 1) % r] = sampled[i]
        return torch.from_numpy(columns), torch.from_numpy(ring)

    def replay_prefix(
        self, emitted: list[tuple[int, list[int]] | None], start: int = 0
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """From what a session emitted per step (`(text, audio)` delay-aligned, or None
        while not ready) recover what each step *sampled*: `(prefix, text [T], audio [T,
        dep_q])`, where `prefix` is the longest run of steps from 0 whose every read-back
        token is known. Steps past it (at least the last max_delay, whose tokens were not
        emitted yet) must run again; draws are a function of (seed, step), so they sample the
        same tokens again. Entries no later step reads (delayed codebooks of the first
        steps) stay 0. `start`: the absolute step of `emitted[0]` (after a prompt)."""
        n = len(emitted)
        text = torch.zeros(n, dtype=torch.long)
        audio = torch.zeros((n, self.dep_q), dtype=torch.long)
        prefix = 0
        for s in range(n - self.max_delay):
            for j in range(self.generated):
                if start + s < self.delays[j]:
                    continue  # never read back (the initial token is read instead)
                out = emitted[s + self.max_delay - self.delays[j]]
                if out is None:
                    break
                if j == 0:
                    text[s] = out[0]
                else:
                    audio[s, j - 1] = out[1][j - 1]
            else:
                prefix = s + 1
                continue
            break
        return prefix, text, audio


def _draws(top_k: int, vocab: int) -> int:
    return vocab if top_k <= 0 or top_k > vocab else top_k


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, two rounds) on int64 tensors in [0, 2^32).

    The multipliers are below 2^31, so no product leaves int64: the same bits on any device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def gumbel_noise(
    seed_lo: torch.Tensor,
    seed_hi: torch.Tensor,
    step: torch.Tensor,
    stream: int,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """Gumbel(0, 1) noise `[B, n]` for the candidate token ids `tokens [B, n]` of one stream
    at one step.

    A pure function of (seed, step, stream, token id): a row's draws never depend on the
    batch, on the order candidates come in, on the number of candidates others keep, or on
    how often the row was stepped before; replaying a session reproduces them without any
    generator state.
    """
    h = _mix32(seed_lo)
    h = _mix32(h ^ seed_hi)
    h = _mix32(h ^ (step & _M32))
    h = _mix32(h ^ stream)  # (B,)
    bits = _mix32(_mix32(h[:, None] ^ tokens) ^ 0x5BD1E995)  # (B, n)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(u))


class LMGen:
    """Streaming generator over `num_rows` independent sessions of one `LMModel`."""

    def __init__(self, lm: LMModel, num_rows: int) -> None:
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows <= 0:
            raise LMGenError(f"num_rows must be a positive integer, got {num_rows!r}")
        cfg = lm.config
        self.lm = lm
        self.num_rows = num_rows
        self.layout = StreamLayout.of(cfg)
        self.max_delay = cfg.max_delay
        dev = lm.device
        self.device = dev
        n, k = num_rows, cfg.num_codebooks
        # length of the per-row ring of delayed tokens: reads lag writes by <= max_delay + 1
        self.token_ring = cfg.max_delay + 2
        self.cache = lm.new_kv_cache(n)
        self.dep_scratch = lm.new_depformer_scratch(n)
        # Each row's step counter is its KV cache position: one counter, advanced by
        # `cache.commit` at the end of a step.
        self.steps = self.cache.pos
        self.tokens = torch.full((n, k, self.token_ring), UNGENERATED, dtype=torch.long, device=dev)
        self.delays = torch.tensor(cfg.delays, dtype=torch.long, device=dev)
        self.initial = torch.tensor(
            [cfg.text_card] + [cfg.card] * cfg.n_q, dtype=torch.long, device=dev
        )
        # per-row sampling parameters: column 0 text, column 1 audio
        self.temperature = torch.zeros(n, 2, dtype=torch.float32, device=dev)
        self.top_k = torch.ones(n, 2, dtype=torch.long, device=dev)  # candidates kept
        self.seed_lo = torch.zeros(n, dtype=torch.long, device=dev)
        self.seed_hi = torch.zeros(n, dtype=torch.long, device=dev)
        # Tokens a prompt already fixed for the next step's target (per row, per generated
        # stream: text + Moshi's codebooks): taken instead of samples, in the depformer's
        # chain too, then cleared (a persona prompt's last frame fixes the delayed codebooks
        # of the first live step's target).
        g = cfg.dep_q + 1
        self.pending = torch.zeros(n, g, dtype=torch.bool, device=dev)
        self.pending_tokens = torch.zeros(n, g, dtype=torch.long, device=dev)
        # A PersonaPlex model's generator feeds each step the user's codes of the step
        # before (its reference writes a step's user frame into the position it predicts):
        # the codes to use next, per row.
        self.user_lag = cfg.persona
        self.user_prev = torch.zeros(n, cfg.num_user_streams, dtype=torch.long, device=dev)
        self.user_streams = torch.arange(cfg.dep_q + 1, k, device=dev)
        # Per-step index constants, made once.
        self._rows = torch.arange(n, device=dev)
        self._user_delays = self.delays[self.user_streams][None, :]  # (1, U)
        self._gen_streams = torch.arange(1, cfg.dep_q + 1, device=dev)[None, :]  # (1, dep_q)
        self._out_streams = torch.arange(cfg.dep_q + 1, device=dev)  # text + Moshi's audio
        self._out_delays = self.delays[None, : cfg.dep_q + 1] - self.max_delay
        # Host-side mirror of the rows (never read back from the device): each row's step
        # counter, None where the row holds no session (never reset, freed or moved away).
        self.host_steps: list[int | None] = [None] * n
        self.sampling: list[SamplingConfig] = [SamplingConfig.greedy()] * n
        self.seeds: list[int | None] = [None] * n

    # ---- row management ------------------------------------------------------------------
    def _check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.num_rows:
            raise LMGenError(f"row must be an integer in [0, {self.num_rows}), got {row!r}")
        return row

    def reset(self, row: int, sampling: SamplingConfig | None = None, seed: int | None = None):
        """Start a new session in `row`; the other rows are not touched."""
        row = self._check_row(row)
        sampling = sampling or SamplingConfig()
        if not isinstance(sampling, SamplingConfig):
            raise LMGenError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)  # global RNG untouched
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise LMGenError(f"seed must be an integer in [0, 2^64) or None, got {seed!r}")
        cfg = self.lm.config
        self.steps[row] = 0
        self.tokens[row] = UNGENERATED
        self.temperature[row, 0] = sampling.text_temperature
        self.temperature[row, 1] = sampling.audio_temperature
        self.top_k[row, 0] = _draws(sampling.text_top_k, cfg.text_card)
        self.top_k[row, 1] = _draws(sampling.audio_top_k, cfg.card)
        self.seed_lo[row] = seed & _M32
        self.seed_hi[row] = (seed >> 32) & _M32
        self.pending[row] = False
        self.host_steps[row] = 0
        self.sampling[row] = sampling
        self.seeds[row] = seed
        # The ring KV cache needs no clearing: a row attends only to entries it wrote.

    def free(self, row: int) -> None:
        """`row`'s session ended: it must be reset before stepping again."""
        self.host_steps[self._check_row(row)] = None

    def move_row(self, src: int, dst: int) -> None:
        """Move the session of row `src` to row `dst` (its whole state; `src` becomes free)."""
        src, dst = self._check_row(src), self._check_row(dst)
        for t in (  # (the step counter moves with the cache)
            self.tokens,
            self.temperature,
            self.top_k,
            self.seed_lo,
            self.seed_hi,
            self.pending,
            self.pending_tokens,
            self.user_prev,
        ):
            t[dst] = t[src]
        self.cache.move_row(src, dst)
        for lst in (self.host_steps, self.sampling, self.seeds):
            lst[dst] = lst[src]
        self.host_steps[src] = None

    def seed_of(self, row: int) -> int | None:
        """The seed a row's session runs with (the drawn one when reset got None)."""
        return self.seeds[self._check_row(row)]

    # ---- validation (host side, before the core) ---------------------------------------
    def _as_long(self, name: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise LMGenError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise LMGenError(f"{name} must hold integers, got {value.dtype}")
        if tuple(value.shape) != shape:
            raise LMGenError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
        return value.to(device="cpu", dtype=torch.long)

    def _as_mask(self, name: str, value: torch.Tensor | None, b: int) -> torch.Tensor | None:
        if value is None:
            return None
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
            raise LMGenError(f"{name} must be a bool tensor")
        if tuple(value.shape) != (b,):
            raise LMGenError(f"{name} must have shape [{b}], got {list(value.shape)}")
        return value.cpu()

    @staticmethod
    def _check_range(name: str, values: torch.Tensor, rows: torch.Tensor, high: int) -> None:
        picked = values[rows]
        if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= high):
            bad = rows[((picked < 0) | (picked >= high)).view(len(rows), -1).any(1)].tolist()
            raise LMGenError(f"{name} out of range [0, {high}) for row(s) {bad}")

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
        """Advance the active rows of `[0, B)` by one 80 ms step in one batched model call.

        `user_codes [B, n_q - dep_q]` (B <= num_rows): the user's audio codes for this step
        (rows of inactive rows are ignored). `active [B]` (default: every row in use). Where
        `force[i]`, row i's sampled tokens are replaced by `force_text[i]` / `force_audio[i]`.
        Returns CPU tensors of B rows.
        """
        cfg = self.lm.config
        if not isinstance(user_codes, torch.Tensor) or user_codes.dim() != 2:
            raise LMGenError("user_codes must be a [B, n_user] torch.Tensor")
        b = user_codes.shape[0]
        if not 1 <= b <= self.num_rows:
            raise LMGenError(f"user_codes must have 1..{self.num_rows} rows, got {b}")
        codes = self._as_long("user_codes", user_codes, (b, cfg.num_user_streams))
        act = self._as_mask("active", active, b)
        if act is None:
            act = torch.tensor([h is not None for h in self.host_steps[:b]], dtype=torch.bool)
        not_reset = [i for i in range(b) if act[i] and self.host_steps[i] is None]
        if not_reset:
            raise LMGenError(f"row(s) {not_reset} are active but were never reset")
        forced = self._as_mask("force", force, b)
        if forced is not None:
            if force_text is None or force_audio is None:
                raise LMGenError("force needs both force_text and force_audio")
            if (forced & ~act).any():
                raise LMGenError("force is set for inactive row(s)")
            f_text = self._as_long("force_text", force_text, (b,))
            f_audio = self._as_long("force_audio", force_audio, (b, cfg.dep_q))
        elif force_text is not None or force_audio is not None:
            raise LMGenError("force_text/force_audio given without force")
        else:
            forced = torch.zeros(b, dtype=torch.bool)
            f_text = torch.zeros(b, dtype=torch.long)
            f_audio = torch.zeros(b, cfg.dep_q, dtype=torch.long)
        rows = act.nonzero()[:, 0]  # (host tensors: no device sync)
        if rows.numel() == 0:
            return self._empty_result(b)
        self._check_range("user_codes", codes, rows, cfg.card)
        frows = forced.nonzero()[:, 0]
        self._check_range("force_text", f_text, frows, cfg.text_card)
        self._check_range("force_audio", f_audio, frows, cfg.card)

        inputs = tuple(
            t.to(self.device, non_blocking=True) for t in (codes, act, forced, f_text, f_audio)
        )
        out = self.core(*inputs, shape=self.core_shape(b, act, forced))
        self.advance(rows.tolist())
        text, audio, ready, s_text, s_audio, steps = (t.cpu() for t in out)
        return StepResult(text, audio, ready, s_text, s_audio, steps)

    def advance(self, rows: Iterable[int]) -> None:
        """Keep the host mirror in step with the device: `rows` advanced one step. Whoever
        runs the core (eagerly or by replaying its graph) calls this after every run."""
        for r in rows:
            self.host_steps[r] += 1

    def core_shape(self, b: int, active: torch.Tensor, forced: torch.Tensor) -> CoreShape:
        """The static values of an eager step of rows `[0, b)`, from the host mirror only.

        The attention always spans the whole ring (masked where a row holds fewer steps), as
        in a captured step: attending over fewer entries would round the softmax sums
        differently, so a row's tokens would depend on its neighbours' histories and on
        eager or captured stepping. (A masked entry adds an exact zero; the reduction over
        a different length does not keep the order of the others.) Only the sampling widths
        are sized to the batch, which `_sample` makes row-exact."""
        cfg = self.lm.config
        counts = [min((self.host_steps[r] or 0) + 1, cfg.context) for r in range(b)]
        length = cfg.context
        k_text = k_audio = 0
        free_running = False
        for r in range(b):
            if active[r] and not forced[r]:
                free_running = True
                sc = self.sampling[r]
                if sc.text_temperature > 0:
                    k_text = max(k_text, _draws(sc.text_top_k, cfg.text_card))
                if sc.audio_temperature > 0:
                    k_audio = max(k_audio, _draws(sc.audio_top_k, cfg.card))
        masked = min(counts) < length or self.lm.window < cfg.context
        return CoreShape(length, masked, k_text, k_audio, free_running)

    def widest_shape(self, sampling: SamplingConfig) -> CoreShape:
        """The costliest eager step rows sampling with `sampling` can take: the whole
        context attended (masked), their top-k candidates drawn (what a warm-up times)."""
        cfg = self.lm.config
        k_text = _draws(sampling.text_top_k, cfg.text_card) if sampling.text_temperature else 0
        k_audio = _draws(sampling.audio_top_k, cfg.card) if sampling.audio_temperature else 0
        return CoreShape(cfg.context, True, k_text, k_audio)

    def full_shape(self) -> CoreShape:
        """The static values of a captured step: valid for any rows and parameters."""
        cfg = self.lm.config
        return CoreShape(cfg.context, True, cfg.text_card, cfg.card)

    def core(
        self,
        codes: torch.Tensor,
        active: torch.Tensor,
        forced: torch.Tensor,
        f_text: torch.Tensor,
        f_audio: torch.Tensor,
        *,
        shape: CoreShape,
    ) -> tuple[torch.Tensor, ...]:
        """The device part of a step of rows `[0, B)` (B = codes.shape[0]): static shapes,
        no host synchronisation. Inactive rows keep their state; forced rows take the given
        tokens instead of sampling, and so do a row's pending tokens (per stream). Returns (text, audio, ready, sampled text, sampled
        audio, steps), each with B rows."""
        lm = self.lm
        cfg = lm.config
        b = codes.shape[0]
        rows = self._rows[:b]
        t = self.steps[:b]  # (B,)
        tokens = self.tokens[:b]  # (B, K, R)
        act2 = active[:, None]
        if self.user_lag:  # this step takes the user's codes of the step before
            prev = self.user_prev[:b]
            lagged = prev.clone()
            prev.copy_(torch.where(act2, codes, prev))
            codes = lagged
        # Where a token of the target is fixed: the caller's (whole rows), a prompt's (per
        # stream); a fixed token replaces the sample and feeds the depformer's chain.
        pending = self.pending[:b] & act2  # (B, 1 + dep_q)
        fixed = pending | forced[:, None]
        fixed_tokens = torch.where(
            forced[:, None], torch.cat([f_text[:, None], f_audio], 1), self.pending_tokens[:b]
        )
        # 1. store the user's codes at t + delay.
        us = self.user_streams[None, :]
        pos = (t[:, None] + self._user_delays) % self.token_ring  # (B, U)
        tokens[rows[:, None], us, pos] = torch.where(act2, codes, tokens[rows[:, None], us, pos])
        # 2. read this step's input tokens.
        inp = tokens[rows, :, t % self.token_ring]  # (B, K)
        # rows that do not advance read the initial tokens (their ring may hold fillers)
        use_initial = (t[:, None] <= self.delays[None, :]) | ~act2
        inp = torch.where(use_initial, self.initial[None, :], inp)
        # 3. temporal transformer + text token.
        plan = lm.plan_step(t, shape.length, shape.masked, active)
        hidden, text_logits = lm.temporal_step(inp, self.cache, plan)
        text = self._sample(text_logits.float(), 0, t, shape.k_text)
        text = torch.where(fixed[:, 0], fixed_tokens[:, 0], text)
        # 4. depformer: Moshi's dep_q codes, codebook after codebook.
        audio = f_audio
        if shape.depformer:
            scratch = self.dep_scratch.views(b)
            token = text
            sampled = []
            for q in range(cfg.dep_q):
                logits = lm.depformer_step(q, hidden, token, scratch[q])
                token = self._sample(logits.float(), 1 + q, t, shape.k_audio)
                token = torch.where(fixed[:, 1 + q], fixed_tokens[:, 1 + q], token)
                sampled.append(token)
            audio = torch.stack(sampled, dim=1)
        # 5. store the sampled tokens at t + 1 and advance the active rows.
        t1 = t + active.long()
        idx1 = (t + 1) % self.token_ring
        old = tokens[rows, :, idx1]  # (B, K)
        new = old.clone()
        new[:, 0] = text
        new[:, 1 : cfg.dep_q + 1] = audio
        tokens[rows, :, idx1] = torch.where(act2, new, old)
        self.pending[:b] &= ~act2  # consumed by this step
        self.cache.commit(b, 1, active)  # t becomes t1
        # 6. the delay-aligned frame of each ready row.
        ready = active & (t1 > self.max_delay)
        idx = (t1[:, None] + self._out_delays) % self.token_ring
        frame = tokens[rows[:, None], self._out_streams, idx]
        frame = torch.where(ready[:, None], frame, torch.full_like(frame, NOT_READY))
        not_run = torch.full_like(text, NOT_READY)
        s_text = torch.where(active, text, not_run)
        s_audio = torch.where(act2, audio, torch.full_like(audio, NOT_READY))
        return frame[:, 0], frame[:, 1:], ready, s_text, s_audio, t1.clone()

    def _sample(
        self, logits: torch.Tensor, stream: int, step: torch.Tensor, kmax: int
    ) -> torch.Tensor:
        """One token per row of `logits [B, V]` (float32), each row with its own parameters.

        Greedy rows (temperature 0) take the argmax (the first maximum). Sampled rows keep
        their top_k candidates and take the Gumbel-max of them: argmax(logit / T + g) is a
        draw from the softmax restricted to those candidates, with `g` a function of the
        row's seed, step, stream and the candidate's token id (see `gumbel_noise`). `kmax`
        (static) is the most candidates any row keeps; 0 when every row is greedy.

        The candidates are defined by the row alone, whatever `kmax` (it is the widest row
        of the batch eagerly, the whole vocabulary in a captured step): the tokens above the
        row's k-th largest value, then the tokens equal to it by increasing id until there
        are k. `topk`'s order among equal values is unspecified and differs with its k, and
        half-precision logits tie often; this is what keeps a row's draws independent of
        its neighbours and of eager or captured stepping.
        """
        greedy = logits.argmax(-1)
        if kmax == 0:
            return greedy
        col = 0 if stream == 0 else 1
        b = logits.shape[0]
        temp = self.temperature[:b, col]
        scaled = logits / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
        k = self.top_k[:b, col, None].clamp(1, kmax)  # (B, 1) this row's candidates
        vals = scaled.topk(kmax, dim=-1).values  # (B, kmax) descending: well defined, unlike ids
        kth = vals.gather(-1, k - 1)  # (B, 1) the row's k-th largest value
        above = scaled > kth
        tied = scaled == kth
        room = k - above.sum(-1, keepdim=True)  # tied tokens to take, >= 1
        chosen = above | (tied & (tied.cumsum(-1) <= room))  # (B, V): exactly k per row
        ids = chosen.to(scaled.dtype).topk(kmax, dim=-1).indices  # the k, then any others
        valid = chosen.gather(-1, ids)
        g = gumbel_noise(self.seed_lo[:b], self.seed_hi[:b], step, stream, ids)
        score = torch.where(valid, scaled.gather(-1, ids) + g, torch.full_like(g, -math.inf))
        picked = ids.gather(-1, score.argmax(-1, keepdim=True))[:, 0]
        return torch.where(temp > 0, picked, greedy)

    # ---- teacher-forced prefixes: failover replay, persona prompts --------------------------
    def fresh_ring(self) -> torch.Tensor:
        """A row's token ring before its first step (`[K, R]`, host)."""
        return torch.full((self.layout.num_streams, self.token_ring), UNGENERATED, dtype=torch.long)

    def replay_plan(
        self,
        user_codes: torch.Tensor,
        text: torch.Tensor,
        audio: torch.Tensor,
        after: Prefix | None = None,
    ) -> Prefix:
        """The prefix of a session that ran `T` steps with the user's `user_codes [T, U]`
        and sampled `text [T]` and `audio [T, dep_q]` (what each step sampled; entries no
        later step reads, like the delayed codebooks of the first steps, may hold anything
        in range), from a fresh row, or continuing `after` (a persona prompt's prefix)."""
        cfg = self.lm.config
        total = int(user_codes.shape[0])
        if tuple(user_codes.shape) != (total, cfg.num_user_streams):
            raise LMGenError(f"user_codes must be [T, {cfg.num_user_streams}]")
        if tuple(text.shape) != (total,) or tuple(audio.shape) != (total, cfg.dep_q):
            raise LMGenError(f"text must be [T] and audio [T, {cfg.dep_q}] with T = {total}")
        user = user_codes.to("cpu", torch.long)
        sampled = torch.cat([text.to("cpu", torch.long)[:, None], audio.to("cpu", torch.long)], 1)
        start = 0 if after is None else after.steps
        ring = self.fresh_ring() if after is None else after.ring
        fed = user
        prev = None if after is None else after.user_prev
        if self.user_lag:  # each step took the user's codes of the step before
            first = prev if prev is not None else torch.zeros_like(user[0])
            fed = torch.cat([first[None], user[:-1]]) if total else user
            prev = user[-1] if total else prev
        columns, ring = self.layout.simulate(ring, start, fed, sampled, self.initial.cpu())
        if after is not None:
            columns = torch.cat([after.columns, columns])
        g = self.layout.generated
        keep = after is not None and total == 0  # the prompt's fixed tokens are not used yet
        return Prefix(
            columns=columns,
            ring=ring,
            pending=after.pending if keep else torch.zeros(g, dtype=torch.bool),
            pending_tokens=after.pending_tokens if keep else torch.zeros(g, dtype=torch.long),
            user_prev=prev,
        )

    @torch.inference_mode()
    def prefill(
        self,
        row: int,
        user_codes: torch.Tensor,
        text: torch.Tensor,
        audio: torch.Tensor,
        chunk: int = 256,
    ) -> None:
        """Rebuild a freshly reset `row` as if it had run the history of `replay_plan`:
        the temporal transformer takes it in `T / chunk` forwards (`LMModel.
        temporal_prefill`), the token ring and the step counter are set to what the steps
        would have left. The row then steps exactly as the original session."""
        self.load(row, self.replay_plan(user_codes, text, audio), chunk=chunk)

    @torch.inference_mode()
    def load(self, row: int, prefix: Prefix, chunk: int = 256, start: int = 0) -> None:
        """Put `prefix` into a freshly reset `row` (or one holding its first `start` steps,
        e.g. from a cached snapshot): prefill its columns from `start`, then `finish`."""
        self.prefill_columns(row, prefix.columns[start:], start, chunk)
        self.finish(row, prefix)

    @torch.inference_mode()
    def prefill_columns(
        self, row: int, columns: torch.Tensor, start: int, chunk: int = 256
    ) -> None:
        """Steps `start .. start + n - 1` of a prefix through the temporal transformer (no
        depformer, no sampling: only the cache matters) for `row`, which holds the steps
        before `start`; its step counter moves to `start + n`. Callable chunk by chunk, so
        that a long prompt interleaves with other sessions' ticks."""
        row = self._check_row(row)
        if self.host_steps[row] != start:
            raise LMGenError(
                f"row {row} holds {self.host_steps[row]} steps; cannot prefill from {start}"
            )
        n = int(columns.shape[0])
        if n:
            self.lm.temporal_prefill(columns, self.cache, row, chunk, start=start)
        self.steps[row] = start + n
        self.host_steps[row] = start + n

    @torch.inference_mode()
    def finish(self, row: int, prefix: Prefix) -> None:
        """The rest of a prefix's state (ring, fixed tokens, the lagged user codes) for
        `row`, whose cache holds the prefix's steps."""
        row = self._check_row(row)
        if self.host_steps[row] != prefix.steps:
            raise LMGenError(
                f"row {row} holds {self.host_steps[row]} steps, the prefix {prefix.steps}"
            )
        self.tokens[row] = prefix.ring.to(self.device)
        self.pending[row] = prefix.pending.to(self.device)
        self.pending_tokens[row] = prefix.pending_tokens.to(self.device)
        if prefix.user_prev is not None:
            self.user_prev[row] = prefix.user_prev.to(self.device)

    def snapshot(self, row: int, steps: int) -> list[torch.Tensor]:
        """Copies (on the host) of `row`'s keys and values of its first `steps` positions,
        every layer: what a prefix cache keeps. `steps` must not exceed the context."""
        row = self._check_row(row)
        if not 0 < steps <= self.cache.capacity or (self.host_steps[row] or 0) < steps:
            raise LMGenError(f"cannot snapshot {steps} steps of row {row}")
        return self.cache.copy_out(row, steps)

    def restore(self, row: int, kv: list[torch.Tensor], steps: int) -> None:
        """`row` (freshly reset) takes a snapshot's keys and values of its first `steps`
        positions: one copy, instead of a prefill."""
        row = self._check_row(row)
        if self.host_steps[row] != 0:
            raise LMGenError(f"restore needs a freshly reset row; row {row} is not")
        self.cache.copy_in(row, kv)
        self.steps[row] = steps
        self.host_steps[row] = steps

    def _empty_result(self, b: int) -> StepResult:
        q = self.lm.config.dep_q
        return StepResult(
            text=torch.full((b,), NOT_READY, dtype=torch.long),
            audio=torch.full((b, q), NOT_READY, dtype=torch.long),
            ready=torch.zeros(b, dtype=torch.bool),
            sampled_text=torch.full((b,), NOT_READY, dtype=torch.long),
            sampled_audio=torch.full((b, q), NOT_READY, dtype=torch.long),
            steps=self.steps[:b].cpu().clone(),
        )
