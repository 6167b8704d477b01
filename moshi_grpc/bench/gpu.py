"""`moshi-grpc bench gpu`: sessions per GPU, eager against CUDA graphs, in one short run.

The product's capacity question: how many concurrent conversations fit one card within the
80 ms frame. Builds the moshiko-7b LM preset (seeded random bfloat16 weights: the cost does
not depend on the values) and the full-size Mimi, then for each session count S of
`--sessions` steps a bucket of S rows, the way a replica's tick does:

- LM: the generator's full step (host-side checks, temporal step over a KV cache filled to
  `--fill` steps, depformer, sampling with the default parameters, results to the host),
  eager and replaying the bucket's captured CUDA graph;
- codec: one streaming encode and one decode of S frames (`bench.codec.time_codec_buckets`);
- tick = LM + encode + decode (what one frame of every session costs on the card).

It prints per bucket the p50/p99 of each part, the KV-cache memory per session and the
largest session count whose tick p99 fits `--budget-ms`. Session counts whose KV cache does
not fit the card are reported as such. `--device cpu` with the small presets is a smoke test
of the script itself (tests run it); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    parser.add_argument("--lm-config", default="moshiko-7b", help="LM preset (default moshiko-7b)")
    parser.add_argument("--mimi-config", default="mimi", help="Mimi preset (default mimi)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="LM dtype")
    parser.add_argument("--mimi-dtype", choices=DTYPES, default="float32", help="Mimi dtype")
    parser.add_argument(
        "--sessions", default="1,8,16,32,64,96,128", help="session counts (buckets) to step"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per bucket and mode")
    parser.add_argument("--fill", type=int, default=None, help="KV fill (default: context)")
    parser.add_argument("--modes", default="eager,graphs", help="eager, graphs or both")
    parser.add_argument("--budget-ms", type=float, default=80.0, help="tick budget (80 ms)")
    parser.add_argument(
        "--memory-headroom-gib",
        type=float,
        default=6.0,
        help="GPU memory kept free for activations, graphs and the codec",
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1e3


@dataclass
class Row:
    sessions: int
    mode: str
    lm_ms: tuple[float, float]  # p50, p99 of the LM step
    codec_ms: tuple[float, float]  # p50, p99 of encode + decode of one tick

    @property
    def tick_ms(self) -> tuple[float, float]:
        """p50 as the sum of the parts' p50s; p99 as the sum of their p99s (an upper bound:
        the LM and the codec are separate services, their slow steps need not coincide)."""
        return self.lm_ms[0] + self.codec_ms[0], self.lm_ms[1] + self.codec_ms[1]


def _lm_times(lm, sessions: int, steps: int, fill: int, graphs: bool) -> list[float]:
    """Seconds per full generator step of `sessions` rows (eager, or replaying a graph)."""
    import torch

    from moshi_grpc.bench.lm import fake_history
    from moshi_grpc.models.lm_gen import LMGen
    from moshi_grpc.services.common.cuda_graphs import BucketGraphs

    cfg = lm.config
    gen = LMGen(lm, sessions)
    fake_history(gen, fill)  # default sampling, random past keys/values and tokens
    dev = lm.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    b, q = sessions, cfg.dep_q
    step = None  # eager: the generator's own step (host checks, tightest shape)
    if graphs:
        shape = gen.full_shape()
        captured = BucketGraphs(lambda _shape, *x: gen.core(*x, shape=shape), dev)
        example = (
            torch.zeros((b, cfg.num_user_streams), dtype=torch.long, device=dev),
            torch.ones(b, dtype=torch.bool, device=dev),
            torch.zeros(b, dtype=torch.bool, device=dev),
            torch.zeros(b, dtype=torch.long, device=dev),
            torch.zeros((b, q), dtype=torch.long, device=dev),
        )
        captured.capture(b, shape, example)
        fake_history(gen, fill)  # the capture's warm-up stepped the rows
        rows = list(range(b))

        def step(codes):
            out = captured.run(b, (codes, *example[1:]))
            gen.advance(rows)
            return [t.cpu() for t in out]

    g = torch.Generator().manual_seed(sessions)
    out = []
    for i in range(steps + 3):
        codes = torch.randint(0, cfg.card, (b, cfg.num_user_streams), generator=g)
        sync()
        t0 = time.perf_counter()
        gen.step(codes) if step is None else step(codes)  # results on the host, as served
        if i >= 3:  # warm-up steps first
            out.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from moshi_grpc.bench.codec import time_codec_buckets
    from moshi_grpc.models.cpu_fast import prepare_lm_for_cpu
    from moshi_grpc.models.lm import load_lm

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (torch.cuda.is_available() is False); nothing run.")
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if dev.type != "cuda" and "graphs" in modes:
        print("bench gpu: CUDA graphs need --device cuda; running eager only.")
        modes = [m for m in modes if m != "graphs"]
    sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
    lm = load_lm(None, args.lm_config, device=dev, dtype=getattr(torch, args.dtype), seed=0)
    prepare_lm_for_cpu(lm)  # measured CPU forms (a --device cpu run); none on CUDA
    cfg = lm.config
    fill = min(cfg.context - 1, cfg.context if args.fill is None else args.fill)
    kd, vd = lm.kv_dtypes or (lm.dtype, lm.dtype)
    hd = cfg.dim // cfg.num_heads
    per_layer = cfg.num_heads * cfg.context * hd
    kv_bytes = cfg.num_layers * per_layer * (kd.itemsize + vd.itemsize)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    free = None
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0] - args.memory_headroom_gib * 2**30
    print(
        f"bench gpu: {name}; LM {lm.config_name} {args.dtype} ({sum(p.numel() for p in lm.parameters()) / 1e9:.2f} B params), "
        f"Mimi {args.mimi_config} {args.mimi_dtype}; KV cache {kv_bytes / 2**30:.2f} GiB per "
        f"session (context {cfg.context}, fill {fill}); {args.steps} steps per bucket and mode"
    )
    fitting = [s for s in sessions if free is None or s * kv_bytes <= free]
    for s in sessions:
        if s not in fitting:
            print(f"  {s:>4} sessions: KV cache needs {s * kv_bytes / 2**30:.0f} GiB: does not fit")
    codec = {
        (t.sessions, "graphs" if t.graphs else "eager"): t
        for t in time_codec_buckets(
            device=str(dev),
            dtype=args.mimi_dtype,
            num_slots=max(fitting, default=1),
            sessions=fitting,
            graphs=[m == "graphs" for m in modes],
            ticks=args.steps,
            config=args.mimi_config,
        )
    }
    rows: list[Row] = []
    for s in fitting:
        for mode in modes:
            lm_t = _lm_times(lm, s, args.steps, fill, mode == "graphs")
            c = codec[(s, mode)]
            rows.append(Row(s, mode, (_pct(lm_t, 0.5), _pct(lm_t, 0.99)), c.tick_ms))
            r = rows[-1]
            print(
                f"  {s:>4} {mode:>6}: LM p50 {r.lm_ms[0]:7.1f} p99 {r.lm_ms[1]:7.1f}"
                f" | codec p50 {r.codec_ms[0]:6.1f} p99 {r.codec_ms[1]:6.1f}"
                f" | tick p50 {r.tick_ms[0]:7.1f} p99 {r.tick_ms[1]:7.1f} ms",
                flush=True,
            )
    print()
    print("| sessions | mode | LM p50 / p99 ms | codec enc+dec p50 / p99 ms | tick p50 / p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.sessions} | {r.mode} | {r.lm_ms[0]:.1f} / {r.lm_ms[1]:.1f} | "
            f"{r.codec_ms[0]:.1f} / {r.codec_ms[1]:.1f} | "
            f"{r.tick_ms[0]:.1f} / {r.tick_ms[1]:.1f} |"
        )
    for mode in modes:
        fits = [r.sessions for r in rows if r.mode == mode and r.tick_ms[1] <= args.budget_ms]
        best = max(fits) if fits else 0
        print(f"largest session count with tick p99 <= {args.budget_ms:.0f} ms ({mode}): {best}")
    if dev.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")
    eager = {r.sessions: r.lm_ms[0] for r in rows if r.mode == "eager"}
    for r in rows:
        if r.mode == "graphs" and r.sessions in eager:
            print(
                f"  LM step speed-up from CUDA graphs at {r.sessions} sessions: "
                f"{eager[r.sessions] / r.lm_ms[0]:.2f}x (p50)"
            )
    return 0
