"""`moshi-grpc bench lm --prompt`: persona prompts (PersonaPlex), as the LM serves them.

On the chosen preset in PersonaPlex's layout (seeded random weights), through the LM
engine's own runner (services/lm: chunked prefill between ticks, the prefix cache):

- prefill: one session's prompt (`--voice-s` of voice codes, `--prompt-tokens` text tokens,
  the silences) from its open to ready, no live session beside it; against the reference's
  way, one full model step per prompt frame (temporal transformer + depformer; the
  reference runs 16 depformer steps, we time 8: its cost is underestimated, the ratio
  conservative), timed on `--step-sample` steps and scaled;
- cached start: the same prompt again (one copy of its state), and the bytes copied;
- live ticks: `--live` sessions stepping, tick time p50/p99 without a prompt, then while
  prompts prefill one after another beside them (each new one uncached).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt",
        action="store_true",
        help="instead: persona prompts (prefill vs one step per frame, cached start, live "
        "ticks while a prompt prefills), the preset in PersonaPlex's layout",
    )
    parser.add_argument("--voice-s", type=float, default=10.0, help="--prompt: voice seconds")
    parser.add_argument("--prompt-tokens", type=int, default=50, help="--prompt: text tokens")
    parser.add_argument("--live", type=int, default=8, help="--prompt: live sessions")
    parser.add_argument("--ticks", type=int, default=40, help="--prompt: ticks per phase")
    parser.add_argument(
        "--step-sample", type=int, default=40, help="--prompt: full steps actually timed"
    )


def persona_config(config: str) -> dict[str, Any]:
    """`config` (a preset or config.json) in PersonaPlex's layout: its depformer over every
    stream (dep_q = n_q)."""
    from moshi_grpc.models.lm import resolve_config

    cfg, _ = resolve_config(config)
    out = cfg.to_dict()
    out["dep_q"] = out["n_q"]
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1e3


def run_prompt(lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one prompt's prefill, its cached start and the live ticks beside it."""
    import torch

    from moshi_grpc.models.lm_gen import LMGen, SamplingConfig
    from moshi_grpc.models.persona import prompt_length
    from moshi_grpc.services.common.batching import DEFERRED
    from moshi_grpc.services.common.device import synchronize
    from moshi_grpc.services.lm.engine import GenRunner, JoinPayload, StepInput
    from moshi_grpc.services.lm.prefix_cache import PrefixCache
    from moshi_grpc.services.lm.prompts import PersonaRequest, Start

    cfg = lm.config
    g = torch.Generator().manual_seed(0)
    # (a small context, e.g. a smoke test's preset, takes a shorter prompt)
    n_tokens = max(1, min(args.prompt_tokens, (cfg.context - 14) // 2))
    n_voice = max(1, min(round(args.voice_s * 12.5), cfg.context - n_tokens - 14))
    voice = torch.randint(0, cfg.card, (n_voice, cfg.dep_q), generator=g)
    live = max(1, args.live)
    rows = live + 2
    runner = GenRunner(LMGen(lm, rows), rows, lm.device.type == "cuda", PrefixCache(2**32), "b")
    for b in runner.ladder:
        runner.warm_up(b)

    def tokens(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(4, cfg.text_card, (n_tokens,), generator=gen).tolist()

    def prompt(slot: int, seed: int) -> tuple[Start, Any]:
        runner.join(slot, JoinPayload(SamplingConfig(), slot))
        return Start(PersonaRequest(voice, tokens(seed), "bench")), None

    frames = prompt_length(n_voice, n_tokens)
    # 1. the reference's way: one full step per prompt frame (scaled from a sample)
    solo = LMGen(lm, 1)  # one session, batch 1: the reference serves one at a time
    solo.reset(0, SamplingConfig(), seed=1)
    user = torch.zeros(1, cfg.num_user_streams, dtype=torch.long)
    n = max(1, min(args.step_sample, frames - 1))
    solo.step(user)  # warm-up
    synchronize(lm.device)
    t0 = time.perf_counter()
    for _ in range(n):
        solo.step(user)
    synchronize(lm.device)
    stepwise_s = (time.perf_counter() - t0) * (frames - 1) / n
    del solo
    # 2. our prefill, no live session beside it; 3. the same prompt again, from the cache
    out: dict[str, Any] = {
        "frames": frames,
        "voice_frames": n_voice,
        "text_tokens": n_tokens,
        "stepwise_s": stepwise_s,
    }
    for slot, key in ((0, "prefill_s"), (1, "cached_s")):
        start, _ = prompt(slot, 0)
        t0 = time.perf_counter()
        result = DEFERRED
        while result is DEFERRED:
            (result,), _ = runner.run([slot], [start])
        synchronize(lm.device)
        out[key] = time.perf_counter() - t0
        out[f"{key[:-2]}_cached"] = result.cached
        runner.leave(slot)
    per_step = sum(t[0].nbytes for t in lm.new_kv_cache(1).tensors()[:-1]) // cfg.context
    out["copied_bytes"] = per_step * (frames - 1)
    # 4. live ticks, then the same with prompts prefilling beside them
    slots = list(range(2, 2 + live))
    for s in slots:
        runner.join(s, JoinPayload(SamplingConfig(), s))
    gen_codes = torch.Generator().manual_seed(1)

    def tick(extra: list[tuple[int, Any]]) -> tuple[float, list[Any]]:
        codes = torch.randint(0, cfg.card, (live, cfg.num_user_streams), generator=gen_codes)
        payloads = [StepInput(c) for c in codes] + [p for _, p in extra]
        synchronize(lm.device)
        t0 = time.perf_counter()
        results, _ = runner.run(slots + [s for s, _ in extra], payloads)
        synchronize(lm.device)
        return time.perf_counter() - t0, results[live:]

    base = [tick([])[0] for _ in range(args.ticks + 3)][3:]
    with_prompt, seed, slot = [], 1, 0
    start, _ = prompt(slot, seed)
    prompts_done = 0
    for _ in range(args.ticks):
        seconds, (result,) = tick([(slot, start)])
        with_prompt.append(seconds)
        if result is not DEFERRED:  # the next prompt (uncached) on the other slot
            prompts_done += 1
            runner.leave(slot)
            slot, seed = 1 - slot, seed + 1
            start, _ = prompt(slot, seed)
    out.update(
        tick_p50_ms=(_pct(base, 0.5), _pct(with_prompt, 0.5)),
        tick_p99_ms=(_pct(base, 0.99), _pct(with_prompt, 0.99)),
        tick_mean_ms=(statistics.mean(base) * 1e3, statistics.mean(with_prompt) * 1e3),
        prompts_during_ticks=prompts_done,
        chunk_ms=runner.work.chunk_ms,
        step_ms=dict(runner.step_ms),
    )
    return out


def report(lm: Any, args: argparse.Namespace, r: dict[str, Any]) -> None:
    print(
        f"Moshi LM persona prompts: config {lm.config_name} (PersonaPlex layout), dtype "
        f"{args.dtype}, device {args.device}, {args.threads} threads; voice "
        f"{r['voice_frames'] * 0.08:g} s, {r['text_tokens']} text tokens: {r['frames']} prompt "
        "frames"
    )
    print(f"  prefill, open to ready          {r['prefill_s'] * 1e3:10.1f} ms")
    print(
        f"  one full step per frame         {r['stepwise_s'] * 1e3:10.1f} ms"
        f"  (the reference's way; timed {args.step_sample} steps, scaled)"
    )
    print(f"  prefill speed-up                {r['stepwise_s'] / r['prefill_s']:10.1f}x")
    print(
        f"  cached start                    {r['cached_s'] * 1e3:10.1f} ms"
        f"  ({r['copied_bytes'] / 2**20:.1f} MiB copied; cached: {r['cached_cached']})"
    )
    b50, w50 = r["tick_p50_ms"]
    b99, w99 = r["tick_p99_ms"]
    print(
        f"  {args.live} live sessions, tick p50 {b50:.1f} -> {w50:.1f} ms, p99 {b99:.1f} -> "
        f"{w99:.1f} ms while prompts prefill ({r['prompts_during_ticks']} done in "
        f"{args.ticks} ticks): p99 x{w99 / b99:.2f}"
    )
