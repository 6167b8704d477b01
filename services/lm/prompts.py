"""What an LM session runs before its first frame, prefilled in chunks between live ticks.

A session may open with a persona prompt (a PersonaPlex model: voice, silence, role text,
silence; moshi_grpc/models/persona.py) and, when it moved from another replica, a history
to replay. Both are teacher-forced prefixes (`lm_gen.Prefix`): the temporal transformer
takes their columns in batched forwards, no depformer, no sampling. The session's `Start`
payload (one per session) carries both; the runner advances it by chunks, tick after tick
(the scheduler keeps a payload its runner answers `DEFERRED`), so that no live session's
tick waits for a whole prompt:

- the prefix is cut into chunks of `CHUNK` positions, aligned at the start of each of its
  segments (the voice and its silence, the rest of the prompt, the replayed history): the
  arithmetic is then the same whatever the timing, the cache or the load, so a session's
  state never depends on them (a cached start equals an uncached one bit for bit);
- a tick with live rows runs as many chunks as fit in `PREFILL_SHARE` of its own step's
  time (the step's warm time at its bucket, a chunk's measured cost), at least one, so
  that a prompt always progresses; a tick with no live row runs `IDLE_CHUNKS`.

A prompt's state is cached (`prefix_cache.PrefixCache`) at two levels as the prefill passes
them: after the voice and its silence, after the whole prompt. A session whose prompt (or
voice) was cached starts with one copy of that state into its row, then prefills the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moshi_grpc.models.lm_gen import Prefix
from moshi_grpc.models.persona import PersonaPlan, persona_plan, prompt_length
from moshi_grpc.services.common.batching import DEFERRED
from moshi_grpc.services.common.device import synchronize
from moshi_grpc.services.lm.prefix_cache import PROMPT, VOICE, CachedPrefix, PrefixCache, prefix_key

PREFILL_SHARE = 0.2  # of a live tick's step time, at most, spent on prompts in that tick
CHUNK = 16  # positions per prefill forward
IDLE_CHUNKS = 16  # chunks per tick when no live session waits


@dataclass(frozen=True)
class PersonaRequest:
    """A validated persona: voice codes `[V, dep_q]`, the prompt's tokens (wrapped and
    tokenized by the LM), its text (logs)."""

    voice: torch.Tensor
    tokens: list[int]
    text: str

    @property
    def frames(self) -> int:
        """The prompt's frames (its prefix runs one step fewer)."""
        return prompt_length(int(self.voice.shape[0]), len(self.tokens))


@dataclass(frozen=True)
class Prefill:
    """A replayed history, as far as one prefill rebuilds it (failover): the user codes of
    its first T steps and the tokens each of those steps sampled."""

    user_codes: torch.Tensor  # (T, n_user) long
    text: torch.Tensor  # (T,) long
    audio: torch.Tensor  # (T, dep_q) long


@dataclass(frozen=True)
class Start:
    """A session's work before its first frame: its persona prompt and/or the prefilled part
    of its replayed history (the prompt first)."""

    persona: PersonaRequest | None = None
    replay: Prefill | None = None
    opened_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.persona is None and self.replay is None:
            raise ValueError("a Start carries a persona prompt, a replayed history, or both")


@dataclass(frozen=True)
class StartDone:
    """The answer to a `Start`: the prompt's frames, how many came from the cache, whether
    all of them did, and the time from the open to the session being ready."""

    prompt_frames: int
    cached_frames: int
    cached: bool
    ready_ms: float


@dataclass
class _Job:
    start: Start
    plan: Prefix  # the whole prefix: prompt, then replayed history
    done: int  # its steps the row holds
    persona: PersonaPlan | None
    voice_key: str | None
    prompt_key: str | None
    cached_steps: int


class PrefixWork:
    """The runner's prompts and replays in progress, by slot, oldest first."""

    def __init__(self, gen: Any, cache: PrefixCache | None, model_key: str) -> None:
        self.gen = gen
        self.cache = cache
        self.model_key = model_key
        self.jobs: dict[int, _Job] = {}
        self.chunk_ms: float | None = None  # one chunk's prefill: at load, then every chunk
        self.positions = 0  # prefilled since load (tests and metrics read it)

    # -- sizing --------------------------------------------------------------------------

    def budget(self, step_ms: float | None) -> int:
        """Chunks a tick may prefill: `IDLE_CHUNKS` with no live step (or none measured),
        else as many as fit in `PREFILL_SHARE` of the step's `step_ms`, at least one."""
        per = self.chunk_ms
        if step_ms is None or not per:
            return IDLE_CHUNKS
        return max(1, min(IDLE_CHUNKS, int(PREFILL_SHARE * step_ms / per)))

    def _timed(self, row: int, columns: torch.Tensor, start: int) -> None:
        t0 = time.perf_counter()
        self.gen.prefill_columns(row, columns, start, chunk=CHUNK)
        synchronize(self.gen.device)
        if columns.shape[0] == CHUNK:
            ms = (time.perf_counter() - t0) * 1000.0
            prev = self.chunk_ms
            self.chunk_ms = ms if prev is None else 0.8 * prev + 0.2 * ms
        self.positions += int(columns.shape[0])

    def measure(self, row: int) -> None:
        """Time one chunk's prefill on a free, reset `row` (at load)."""
        zeros = torch.zeros(CHUNK, self.gen.layout.num_streams, dtype=torch.long)
        self._timed(row, zeros, 0)

    # -- jobs ----------------------------------------------------------------------------

    def drop(self, slot: int) -> None:
        """The session left: forget its work (its row is freed by the runner)."""
        self.jobs.pop(slot, None)

    def order(self, slots: list[int]) -> list[int]:
        """`slots` with a Start, oldest job first (new ones last, in the given order)."""
        rank = {s: i for i, s in enumerate(self.jobs)}
        return sorted(slots, key=lambda s: rank.get(s, len(rank)))

    def advance(self, slot: int, row: int, start: Start, budget: int) -> tuple[Any, int]:
        """Work on `slot`'s Start for at most `budget` chunks: `(StartDone, used)` when the
        session is ready, `(DEFERRED, used)` when more ticks are needed."""
        job = self.jobs.get(slot)
        if job is None:
            job = self.jobs[slot] = self._new_job(row, start)
        used = 0
        gen, plan = self.gen, job.plan
        while job.done < plan.steps and used < budget:
            segment = next(m for m in (*self._segments(job), plan.steps) if m > job.done)
            n = min(CHUNK, segment - job.done)  # (done is always a segment start + k CHUNKs)
            self._timed(row, plan.columns[job.done : job.done + n], job.done)
            job.done += n
            used += 1
            self._keep(job, row)
        if job.done < plan.steps:
            return DEFERRED, used
        gen.finish(row, plan)
        del self.jobs[slot]
        persona = job.persona
        frames = persona.frames if persona is not None else 0
        cached = persona is not None and job.cached_steps >= persona.prefix.steps
        cached_frames = frames if cached else (job.cached_steps + 1 if job.cached_steps else 0)
        ready_ms = (time.monotonic() - start.opened_at) * 1000.0
        return StartDone(frames, cached_frames, cached, ready_ms), used

    @staticmethod
    def _segments(job: _Job) -> tuple[int, ...]:
        """Where the prefix's segments end (chunks align at their starts): after the voice
        and its silence, after the prompt; the history runs to the end."""
        if job.persona is None:
            return ()
        return (job.persona.voice_steps, job.persona.prefix.steps)

    def _keep(self, job: _Job, row: int) -> None:
        """Snapshot a level the prefill just completed, if it is not cached yet."""
        if self.cache is None or job.persona is None:
            return
        for mark, key in (
            (job.persona.voice_steps, job.voice_key),
            (job.persona.prefix.steps, job.prompt_key),
        ):
            if job.done == mark and key is not None and key not in self.cache:
                tail = job.persona.prefix if key == job.prompt_key else None
                self.cache.put(key, CachedPrefix(self.gen.snapshot(row, mark), mark, tail))

    def _new_job(self, row: int, start: Start) -> _Job:
        """Plan a session's prefix and start it from the deepest cached level, if any."""
        gen = self.gen
        persona = after = None
        voice_key = prompt_key = None
        done = 0
        if start.persona is not None:
            req = start.persona
            cfg = gen.lm.config
            persona = persona_plan(
                gen.layout,
                gen.initial.cpu(),
                gen.fresh_ring(),
                req.voice,
                req.tokens,
                cfg.existing_text_padding_id,
                cfg.card,
                cfg.context,
            )
            after = persona.prefix
            if self.cache is not None:
                voice_key = prefix_key(self.model_key, VOICE, req.voice, None)
                prompt_key = prefix_key(self.model_key, PROMPT, req.voice, req.tokens)
                level, entry = self.cache.lookup(prompt_key, voice_key)
                if entry is not None:
                    gen.restore(row, entry.kv, entry.steps)
                    done = entry.steps
                    if level == PROMPT:
                        after = entry.tail
        plan = after
        if start.replay is not None:
            r = start.replay
            plan = gen.replay_plan(r.user_codes, r.text, r.audio, after=after)
        return _Job(start, plan, done, persona, voice_key, prompt_key, done)
