"""`moshi-grpc bench gpu`: sessions per GPU, eager against CUDA graphs, memory per bucket.

The product's capacity question: how many concurrent conversations fit one card within the
tick target. Builds the moshiko-7b LM preset (seeded random weights, made on the device:
the cost does not depend on the values) and the full-size Mimi, then for each session count
S of `--sessions` steps a bucket of S rows, the way a replica's tick does:

- LM: the generator's full step (host-side checks, temporal step over a KV cache filled to
  `--fill` steps, depformer, sampling with the default parameters, results to the host) in
  three modes. `eager`: the eager step as the service runs it without graphs
  (`LMGen.core_shape`: attention over the filled entries, top-k 25 / 250); `eager-full`:
  the same computation as the graphs, eagerly (`LMGen.full_shape`: the whole ring under a
  mask, sampling over the full vocabularies with a top-k mask); `graphs`: replaying the
  bucket's captured graph of that computation. On CUDA the service runs `graphs`; the
  graphs speed-up is printed against `eager-full` (same work) and against `eager`.
- codec: one streaming encode and one decode of S frames (`bench.codec.time_codec_buckets`);
- tick = LM + encode + decode (what one frame of every session costs on the card).

Memory per bucket (CUDA): what the generator's state takes once allocated (KV cache,
depformer scratch, token rings), the eager step's temporaries (peak above that), the graph
pool (reserved by the capture), the codec replica's peak, and per session; the memory plan's
figures beside them (`moshi_grpc/models/memory_plan.py`). The KV cache is filled on the
device once per session count; after a capture only the counters and token rings are
refilled. An out-of-memory error ends that session count and the table so far is printed.

After the listed counts, a bisection finds the largest session count that fits and whose
tick p99 meets `--budget-ms` (in the service's mode), up to a little above what the memory
plan says fits. `--time-budget-s` stops starting new counts after that many seconds, and
`--out-json` appends each measurement as it is made: a run cut short keeps what it measured.

`--plan` prints the memory plan instead (no device, seconds): `--gpu-memory 80GiB`.
`--device cpu` with the small presets is a smoke test of the script itself (tests run it);
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
MODES = ("eager", "eager-full", "graphs")
# The LM mode a replica runs on each device type (services/lm/engine.py, --cuda-graphs auto).
SERVED_MODE = {"cuda": "graphs", "cpu": "eager"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default) or cpu (smoke test)")
    parser.add_argument("--lm-config", default="moshiko-7b", help="LM preset (default moshiko-7b)")
    parser.add_argument("--mimi-config", default="mimi", help="Mimi preset (default mimi)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="LM dtype")
    parser.add_argument("--mimi-dtype", choices=DTYPES, default="float32", help="Mimi dtype")
    parser.add_argument(
        "--sessions", default="1,2,4,8,16,32", help="session counts (buckets) to step first"
    )
    parser.add_argument(
        "--search",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="then bisect for the largest count that fits and meets --budget-ms (default on)",
    )
    parser.add_argument(
        "--search-max",
        type=int,
        default=None,
        help="upper end of the search (default: a little above what the memory plan fits)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per bucket and mode")
    parser.add_argument("--fill", type=int, default=None, help="KV fill (default: context)")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="LM modes, comma-separated: eager (as served without graphs), eager-full (the "
        "graphs' computation, eagerly), graphs (CUDA only; as served on CUDA)",
    )
    parser.add_argument("--budget-ms", type=float, default=60.0, help="tick p99 target (60 ms)")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=0.0,
        help="start no new session count after this many seconds (0: no limit)",
    )
    parser.add_argument("--out-json", default=None, help="append one JSON line per measurement")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="instead: print the memory plan (weights, KV, scratch, codec state, graph pools, "
        "sessions that fit) from the configs, on any machine, in seconds",
    )
    parser.add_argument(
        "--gpu-memory",
        action="append",
        default=None,
        metavar="SIZE",
        help="with --plan: the card's memory, e.g. 80GiB, 141GB, 81559MiB (repeatable)",
    )
    parser.add_argument(
        "--reserve",
        default="2GiB",
        help="memory kept for the CUDA context, workspaces and allocator rounding (2GiB)",
    )
    parser.add_argument(
        "--prompt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the table, persona prompts on the same LM in PersonaPlex's layout (a "
        "10 s voice, 50 text tokens, 8 live sessions: `bench lm --prompt`; default on)",
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
    encode_ms: tuple[float, float] = (math.nan, math.nan)
    decode_ms: tuple[float, float] = (math.nan, math.nan)

    @property
    def tick_ms(self) -> tuple[float, float]:
        """p50 as the sum of the parts' p50s; p99 as the sum of their p99s (an upper bound:
        the LM and the codec are separate services, their slow steps need not coincide)."""
        return self.lm_ms[0] + self.codec_ms[0], self.lm_ms[1] + self.codec_ms[1]


@dataclass
class Memory:
    """Bytes measured for one session count on CUDA (`None` where not measured)."""

    sessions: int
    lm_state: int | None = None  # allocated by LMGen(S rows): KV cache, scratch, rings
    lm_eager_temporaries: int | None = None  # peak above it during the eager steps
    lm_graph_pool: int | None = None  # reserved by the capture: graph pool + warm-up blocks
    codec_peak: int | None = None  # peak allocated by the codec replica of S slots
    oom: str | None = None  # where an out-of-memory error stopped this count

    def per_session(self) -> float | None:
        parts = (self.lm_state, self.lm_graph_pool or 0, self.codec_peak)
        if any(p is None for p in parts):
            return None
        return sum(parts) / self.sessions


@dataclass
class Result:
    sessions: int
    rows: list[Row] = field(default_factory=list)
    memory: Memory | None = None
    device_error: str | None = None  # the device failed after an out-of-memory error

    def passes(self, mode: str, budget_ms: float) -> bool:
        """Fits the card and meets the tick target in `mode`."""
        if self.memory is not None and self.memory.oom:
            return False
        return any(r.mode == mode and r.tick_ms[1] <= budget_ms for r in self.rows)


def largest_passing(ok: Callable[[int], bool], good: int, bad: int) -> int:
    """Bisection for the largest count in (good, bad) with `ok(count)`, given `ok(good)` (or
    good == 0) and not `ok(bad)`; assumes a count passes whenever a larger one does.
    `ok` may raise `StopIteration` (out of time): the best count so far is returned."""
    while bad - good > 1:
        mid = (good + bad) // 2
        try:
            passed = ok(mid)
        except StopIteration:
            break
        if passed:
            good = mid
        else:
            bad = mid
    return good


def fresh_generator(lm, sessions: int):
    """LMGen of `sessions` rows (a hook for tests to count how often one is built)."""
    from moshi_grpc.models.lm_gen import LMGen

    return LMGen(lm, sessions)


class _LmBucket:
    """One session count's generator: built and filled once, stepped in every mode through
    the service's own runner (`GenRunner`: host inputs in, results back on the host)."""

    def __init__(self, lm, sessions: int, fill: int) -> None:
        from moshi_grpc.bench.lm import fake_history

        self.lm, self.sessions, self.fill = lm, sessions, fill
        self.gen = fresh_generator(lm, sessions)
        fake_history(self.gen, fill, seed=sessions)  # random past keys/values and tokens
        self.runners: dict[str, Any] = {}

    def _runner(self, mode: str) -> Any:
        """The runner of `mode`, its sessions joined (default sampling) at `fill` steps."""
        from moshi_grpc.bench.lm import fake_history
        from moshi_grpc.models.lm_gen import SamplingConfig
        from moshi_grpc.services.lm.engine import GenRunner, JoinPayload

        runner = self.runners.get(mode)
        if runner is None:
            if mode == "eager-full":
                runner = _FullShapeRunner(self.gen, self.sessions, False)
            else:
                runner = GenRunner(self.gen, self.sessions, mode == "graphs")
            if mode == "graphs":  # captured like the service does at load (rows free)
                runner.warm_up(self.sessions)
            for s in range(self.sessions):
                runner.join(s, JoinPayload(SamplingConfig(), s))
            self.runners[mode] = runner
        fake_history(self.gen, self.fill, seed=self.sessions, kv=mode != "graphs")
        return runner

    def time_steps(self, mode: str, steps: int) -> list[float]:
        """Seconds per tick of every session (3 untimed ticks first), as the service runs it."""
        import torch

        from moshi_grpc.services.common.device import synchronize
        from moshi_grpc.services.lm.engine import StepInput

        runner = self._runner(mode)
        cfg, dev = self.lm.config, self.lm.device
        slots = list(range(self.sessions))
        g = torch.Generator().manual_seed(self.sessions)
        out = []
        for i in range(steps + 3):
            codes = torch.randint(0, cfg.card, (self.sessions, cfg.num_user_streams), generator=g)
            payloads = [StepInput(c) for c in codes]
            synchronize(dev)
            t0 = time.perf_counter()
            runner.run(slots, payloads)  # ends with the results on the host: a tick as served
            if i >= 3:
                out.append(time.perf_counter() - t0)
        return out


def _full_shape_runner():
    from moshi_grpc.services.lm.engine import GenRunner

    class FullShapeRunner(GenRunner):
        """The captured computation (whole vocabularies, whole ring) run eagerly."""

        def shape(self, plan, payloads):
            return self.gen.full_shape()

    return FullShapeRunner


def _FullShapeRunner(gen, rows: int, graphs: bool):  # noqa: N802 - a class, built lazily
    return _full_shape_runner()(gen, rows, graphs)


def _random_lm(config: str, device, dtype, seed: int = 0):
    """The LM with seeded random weights made where it runs. On CUDA they are drawn on the
    device (`load_lm` draws on the CPU: ~50 s for the 7B on one core, a slice of a GPU
    check's minutes); elsewhere `load_lm`, the plain model."""
    import torch

    from moshi_grpc.models.cpu_fast import prepare_lm_for_cpu
    from moshi_grpc.models.lm import load_lm
    from moshi_grpc.models.memory_plan import meta_lm

    if device.type != "cuda":
        lm = load_lm(None, config, device=device, dtype=dtype, seed=seed)
        prepare_lm_for_cpu(lm, "off")  # a smoke test there: the plain model
        return lm
    from moshi_grpc.models.lm import resolve_config

    cfg, name = resolve_config(config)
    lm = meta_lm(cfg, dtype).to_empty(device=device)
    lm.config_name = name
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in lm.named_parameters():
            if pname.endswith("alpha"):
                p.fill_(1.0)
            else:
                std = p.shape[-1] ** -0.5
                p.normal_(0.0, std, generator=g).clamp_(-3 * std, 3 * std)
    return lm


class _Journal:
    """Each measurement as one JSON line, flushed as it is made (a killed run keeps them)."""

    def __init__(self, path: str | None, device_name: str) -> None:
        self.path, self.device_name = path, device_name

    def write(self, kind: str, **data: Any) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "device": self.device_name, **data}) + "\n")


def _is_oom(exc: BaseException | None) -> bool:
    """An out-of-memory error, or one raised while handling it (a capture that ran out of
    memory fails again when the graph context closes)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, oom) or "out of memory" in str(exc).lower():
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _free(dev) -> None:
    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def _measure(
    lm, mimi, sessions: int, modes: list[str], args: argparse.Namespace, fill: int
) -> Result:
    """Every mode of one session count; memory on CUDA. An out-of-memory error ends the
    count (recorded in `memory.oom`), whatever was timed before it is kept."""
    import torch

    from moshi_grpc.bench.codec import time_codec_buckets

    dev = lm.device
    cuda = dev.type == "cuda"
    res = Result(sessions, memory=Memory(sessions))
    mem = res.memory
    lm_times: dict[str, list[float]] = {}
    stage = "LM state"
    held: dict[str, _LmBucket] = {}  # dropped in `finally`, also after an out-of-memory error
    try:
        _free(dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        bucket = held["lm"] = _LmBucket(lm, sessions, fill)
        if cuda:
            mem.lm_state = torch.cuda.memory_allocated(dev) - base
        for mode in modes:
            stage = f"LM {mode}"
            if cuda and mode == "graphs":
                reserved = torch.cuda.memory_reserved(dev)
                bucket._runner("graphs")  # captured here, as the service does at load
                mem.lm_graph_pool = torch.cuda.memory_reserved(dev) - reserved
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                allocated = torch.cuda.memory_allocated(dev)
            lm_times[mode] = bucket.time_steps(mode, args.steps)
            if cuda and mode != "graphs":
                temp = torch.cuda.max_memory_allocated(dev) - allocated
                mem.lm_eager_temporaries = max(mem.lm_eager_temporaries or 0, temp)
        del bucket
        held.clear()
        _free(dev)
        stage = "codec"
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        codec_graphs = sorted({m == "graphs" for m in modes})
        timings = time_codec_buckets(
            device=str(dev), dtype=args.mimi_dtype, num_slots=sessions, sessions=[sessions],
            graphs=codec_graphs, ticks=args.steps, mimi=mimi,
        )  # fmt: skip
        if cuda:
            mem.codec_peak = torch.cuda.max_memory_allocated(dev) - base
        codec = {t.graphs: t for t in timings}
        for mode in modes:
            c = codec[mode == "graphs"]
            t = lm_times[mode]
            res.rows.append(
                Row(sessions, mode, (_pct(t, 0.5), _pct(t, 0.99)), c.tick_ms,
                    c.encode_ms, c.decode_ms)
            )  # fmt: skip
    except Exception as exc:  # an OOM ends this count; anything else is a bug: raise
        if not _is_oom(exc):
            raise
        mem.oom = f"{stage}: {str(exc).splitlines()[0][:160]}"
    finally:
        held.clear()
        try:
            _free(dev)
        except Exception as exc:  # the device did not recover from the error
            res.device_error = str(exc).splitlines()[0][:160]
    if not cuda and not mem.oom:
        res.memory = None  # nothing measured; an out-of-memory error is still reported
    return res


def _print_row(r: Row) -> None:
    print(
        f"  {r.sessions:>4} {r.mode:>10}: LM p50 {r.lm_ms[0]:7.1f} p99 {r.lm_ms[1]:7.1f}"
        f" | codec p50 {r.codec_ms[0]:6.1f} p99 {r.codec_ms[1]:6.1f}"
        f" | tick p50 {r.tick_ms[0]:7.1f} p99 {r.tick_ms[1]:7.1f} ms",
        flush=True,
    )


def _gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def _mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _print_tables(results: list[Result], plan_per_session: int | None) -> None:
    rows = [r for res in results for r in res.rows]
    print()
    print(
        "| sessions | mode | LM p50 / p99 ms | codec enc p50 / p99 | codec dec p50 / p99 | "
        "codec enc+dec p50 / p99 ms | tick p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r.sessions, MODES.index(r.mode))):
        print(
            f"| {r.sessions} | {r.mode} | {r.lm_ms[0]:.1f} / {r.lm_ms[1]:.1f} | "
            f"{r.encode_ms[0]:.1f} / {r.encode_ms[1]:.1f} | "
            f"{r.decode_ms[0]:.1f} / {r.decode_ms[1]:.1f} | "
            f"{r.codec_ms[0]:.1f} / {r.codec_ms[1]:.1f} | "
            f"{r.tick_ms[0]:.1f} / {r.tick_ms[1]:.1f} |"
        )
    mems = [res.memory for res in results if res.memory is not None]
    if mems:
        plan = "-" if plan_per_session is None else _gib(plan_per_session)
        print()
        print(
            "| sessions | LM state GiB | LM eager temporaries MiB | LM capture MiB | "
            "codec peak MiB | per session GiB | plan per session GiB | out of memory |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for m in sorted(mems, key=lambda m: m.sessions):
            print(
                f"| {m.sessions} | {_gib(m.lm_state)} | {_mib(m.lm_eager_temporaries)} | "
                f"{_mib(m.lm_graph_pool)} | {_mib(m.codec_peak)} | {_gib(m.per_session())} | "
                f"{plan} | {m.oom or '-'} |"
            )
        ok = sorted((m for m in mems if m.lm_state is not None), key=lambda m: m.sessions)
        if len(ok) >= 2 and ok[-1].sessions > ok[0].sessions:
            a, b = ok[0], ok[-1]
            slope = (b.lm_state - a.lm_state) / (b.sessions - a.sessions)
            print(f"LM state per added session: {_gib(slope)} GiB (plan: {plan} GiB with codec)")


def run_plan(args: argparse.Namespace) -> int:
    """`--plan`: the memory plan for each `--gpu-memory`, as markdown tables."""
    import torch

    from moshi_grpc.models import memory_plan as mp
    from moshi_grpc.models.lm import resolve_config

    try:
        sizes = [(s, mp.parse_size(s)) for s in (args.gpu_memory or ["80GiB", "141GiB"])]
        reserve = mp.parse_size(args.reserve)
        cfg, name = resolve_config(args.lm_config)
        mimi = mp.meta_mimi(args.mimi_config, getattr(torch, args.mimi_dtype))
    except ValueError as exc:
        print(f"bench gpu --plan: {exc}")
        return 2
    lm_dtype = getattr(torch, args.dtype)
    lm = mp.lm_memory(cfg, lm_dtype)
    codec = mp.codec_memory(mimi)
    lm_meta = mp.meta_lm(cfg, lm_dtype)
    pools = mp.graph_pools(lm_meta, mimi)
    for label, size in sizes:
        plan = mp.plan_sessions(size, lm, codec, pools=pools, reserve=reserve)
        title = (
            f"Memory plan, {label}: {name} {args.dtype} + Mimi {args.mimi_config} "
            f"{args.mimi_dtype}, graphs on"
        )
        print(mp.format_plan(plan, title))
        alone = mp.plan_sessions(size, lm, None, pools=mp.graph_pools(lm_meta), reserve=reserve)
        print(f"LM alone on the card (codec elsewhere): {alone.sessions} sessions.")
        print()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.plan:
        return run_plan(args)
    import torch

    from moshi_grpc.models import memory_plan as mp
    from moshi_grpc.models.cpu_fast import MimiForms, prepare_mimi_for_cpu
    from moshi_grpc.models.mimi import load_mimi

    t_start = time.monotonic()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (torch.cuda.is_available() is False); nothing run.")
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        print(f"bench gpu: unknown mode(s) {unknown or modes}; choose from {', '.join(MODES)}")
        return 2
    if dev.type != "cuda" and "graphs" in modes:
        print("bench gpu: CUDA graphs need --device cuda; running the eager modes only.")
        modes = [m for m in modes if m != "graphs"]
    served = SERVED_MODE["cuda" if dev.type == "cuda" else "cpu"]
    search_mode = served if served in modes else modes[-1]
    sessions = sorted({int(s) for s in args.sessions.split(",") if s.strip()})
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)  # mem_get_info(torch.device) needs torch >= 2.5
        torch.cuda.set_device(dev)
    dtype = getattr(torch, args.dtype)
    lm = _random_lm(args.lm_config, dev, dtype)
    mimi = load_mimi(
        None, device=dev, dtype=getattr(torch, args.mimi_dtype), config=args.mimi_config
    )
    if mimi.device.type == "cpu":  # a smoke test there: no time spent choosing CPU forms
        prepare_mimi_for_cpu(mimi, MimiForms.parse("off"))
    cfg = lm.config
    fill = min(cfg.context - 1, cfg.context if args.fill is None else args.fill)
    lm_mem = mp.lm_memory(cfg, dtype, lm.kv_dtypes)
    codec_mem = mp.codec_memory(mp.meta_mimi(args.mimi_config, mimi.dtype))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    journal = _Journal(args.out_json, name)
    plan = None
    if dev.type == "cuda":
        total = torch.cuda.mem_get_info(dev.index)[1]
        pools = mp.graph_pools(mp.meta_lm(cfg, dtype), mp.meta_mimi(args.mimi_config, mimi.dtype))
        plan = mp.plan_sessions(total, lm_mem, codec_mem, pools=pools)
    params = sum(p.numel() for p in lm.parameters())
    print(
        f"bench gpu: {name}; LM {lm.config_name} {args.dtype} ({params / 1e9:.2f} B params), "
        f"Mimi {args.mimi_config} {args.mimi_dtype}; KV cache {lm_mem.kv_per_row / 2**30:.3f} "
        f"GiB per session (context {cfg.context}, fill {fill}); {args.steps} steps per bucket "
        f"and mode; modes {', '.join(modes)} (the service runs {served} here)"
        + (f"; memory plan: {plan.sessions} sessions fit this card" if plan else ""),
        flush=True,
    )
    journal.write(
        "start", lm=lm.config_name, dtype=args.dtype, mimi=args.mimi_config,
        mimi_dtype=args.mimi_dtype, modes=modes, steps=args.steps, fill=fill,
        plan_sessions=plan.sessions if plan else None,
    )  # fmt: skip
    results: dict[int, Result] = {}

    lost: list[str] = []  # set when the device fails after an out-of-memory error

    def out_of_time() -> bool:
        return bool(lost) or 0 < args.time_budget_s < time.monotonic() - t_start

    def measure(s: int, which: list[str]) -> Result:
        res = _measure(lm, mimi, s, which, args, fill)
        results[s] = res
        for r in res.rows:
            _print_row(r)
            journal.write("timing", **asdict(r), tick_ms=r.tick_ms)
        if res.memory is not None:
            journal.write("memory", **asdict(res.memory))
            if res.memory.oom:
                print(f"  {s:>4} sessions: out of memory ({res.memory.oom})", flush=True)
        if res.device_error:
            lost.append(res.device_error)
            print(f"  the device failed after that ({res.device_error}): stopping", flush=True)
        return res

    stopped = None
    for s in sessions:
        if out_of_time():
            stopped = s
            break
        measure(s, modes)
    passing = [s for s, r in results.items() if r.passes(search_mode, args.budget_ms)]
    failing = [s for s, r in results.items() if not r.passes(search_mode, args.budget_ms)]
    good = max(passing, default=0)
    if args.search and stopped is None:
        cap = args.search_max
        if cap is None and plan is not None:
            cap = plan.sessions + max(2, plan.sessions // 8)  # the plan is an estimate
        bad = min([s for s in failing if s > good], default=(cap or good) + 1)

        def ok(s: int) -> bool:
            if out_of_time():
                raise StopIteration
            return measure(s, [search_mode]).passes(search_mode, args.budget_ms)

        if bad - good > 1:
            print(f"searching ({search_mode}) between {good} and {bad} sessions", flush=True)
        good = largest_passing(ok, good, bad)
    if lost:
        print("stopped early: the device failed after an out-of-memory error", flush=True)
    elif stopped is not None or out_of_time():
        print(f"time budget of {args.time_budget_s:.0f} s reached: stopped early", flush=True)
    _print_tables(list(results.values()), plan.per_session if plan else None)
    for mode in modes:
        fits = [r.sessions for res in results.values() for r in res.rows if r.mode == mode]
        fits = [s for s in fits if results[s].passes(mode, args.budget_ms)]
        best = max(fits) if fits else 0
        print(f"largest session count with tick p99 <= {args.budget_ms:.0f} ms ({mode}): {best}")
    print(f"largest session count found by the search ({search_mode}): {good}")
    journal.write("result", mode=search_mode, budget_ms=args.budget_ms, sessions=good)
    if dev.type == "cuda" and not lost:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")
    lm_p50 = {(r.sessions, r.mode): r.lm_ms[0] for res in results.values() for r in res.rows}
    for (s, mode), t in sorted(lm_p50.items()):
        if mode != "graphs":
            continue
        for base in ("eager-full", "eager"):
            if (s, base) in lm_p50:
                print(
                    f"  LM step speed-up from CUDA graphs at {s} sessions: "
                    f"{lm_p50[(s, base)] / t:.2f}x against {base} (p50)"
                )
    if args.prompt and not lost and not out_of_time():
        _prompt_figures(lm, args, journal)
    return 0


def _prompt_figures(lm, args: argparse.Namespace, journal) -> None:
    """`bench lm --prompt` on this LM: the same weights with PersonaPlex's rules switched on
    (a persona model's cost is its moshiko twin's; only the generator's rules differ)."""
    from dataclasses import replace

    from moshi_grpc.bench import prompt
    from moshi_grpc.models.persona import SILENCE_TOKENS, SINE_TOKENS

    if max(SILENCE_TOKENS + SINE_TOKENS) >= lm.config.card:
        print(f"persona prompts: skipped ({lm.config_name}'s codebooks are too small)")
        return
    _free(lm.device)
    lm.config = replace(lm.config, depformer_steps=lm.config.n_q)
    options = argparse.Namespace(
        voice_s=10.0,
        prompt_tokens=50,
        live=8,
        ticks=args.steps,
        step_sample=args.steps,
        dtype=args.dtype,
        device=str(lm.device),
        threads=1,
    )
    try:
        figures = prompt.run_prompt(lm, options)
    except Exception as exc:  # an out-of-memory error ends only this part
        if not _is_oom(exc):
            raise
        print(f"persona prompts: out of memory ({str(exc).splitlines()[0][:160]})")
        return
    print()
    prompt.report(lm, options, figures)
    journal.write("prompt", **{k: v for k, v in figures.items() if k != "step_ms"})
