"""`moshi-grpc bench codec`: streaming Mimi, ms per 80 ms frame, encode and decode.

For each batch size, N streams advance one frame per call (our batched streaming API); the
figure is the median wall time of one call after warm-up, so "ms per frame" is per call for
the whole batch, and the real-time factor is N x 80 ms / that time.

`--reference` also runs the public reference package (PyPI `moshi`, in its own venv, so in a
subprocess with that venv's python) on the same weights file, in the same run, one
configuration after the other (never concurrently), and prints ours / reference.

On CPU the model runs with the CPU forms of moshi_grpc/models/cpu_fast.py (`--cpu-forms`:
auto measures at load which are faster here; on; off = the plain model; or a list of form
names); the header says which were chosen, and the run prints how many codebook levels the
certified search handed back to the exact path (near-ties).

Serving modes, through the codec engine's runner (`StreamerRunner`: live streams packed
into a row prefix, each tick stepping the smallest bucket of rows that holds them):

- `--load 1/1,1/16,4/4,4/16` (sessions/slots): tick time of N sessions on a replica of M
  slots, against M = N: compute follows load, not capacity (issue target: within 1.25x).
- `--buckets M`: encode, decode and tick p50/p99 per bucket of an M-slot replica, eager
  and (on CUDA) with CUDA graphs, and the state memory per slot; `time_codec_buckets` is
  the same as a function for the GPU benchmark.

On a shared machine, prefer `--threads 1` for comparisons: with 2 OpenMP threads and other
processes on the cores, every parallel region can wait a scheduler slice (~10 ms) for its
second thread, which swamps per-frame work of a few ms on either side. Where the speed of
the whole machine drifts from minute to minute (a VM sharing memory bandwidth), `--rounds R`
alternates ours and the reference R times and prints the medians over the rounds and each
round's frame ratio, so that one slow minute does not decide the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moshi_grpc.bench import flags

FRAME = 1920
FRAME_MS = 80.0

# Timing loop run by the reference python (imports `moshi`, the public package).
_REFERENCE_SCRIPT = r"""
import json, sys, time, statistics, torch
from moshi.models import loaders
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
model = loaders.get_mimi(cfg["weights"], num_codebooks=cfg["num_codebooks"], device="cpu")
model.eval()
out = {}
g = torch.Generator().manual_seed(0)
for b in cfg["batches"]:
    n = cfg["warmup"] + cfg["frames"]
    pcm = 0.1 * torch.randn(b, 1, n * 1920, generator=g)
    enc_t, dec_t, enc_c, dec_c = [], [], [], []
    with torch.no_grad(), model.streaming(b):
        codes = []
        for i in range(n):
            c0, t = time.process_time(), time.perf_counter()
            c = model.encode(pcm[:, :, i * 1920:(i + 1) * 1920])
            enc_t.append(time.perf_counter() - t)
            enc_c.append(time.process_time() - c0)
            codes.append(c)
        for i in range(n):
            c0, t = time.process_time(), time.perf_counter()
            model.decode(codes[i])
            dec_t.append(time.perf_counter() - t)
            dec_c.append(time.process_time() - c0)
    w = cfg["warmup"]
    out[str(b)] = [statistics.median(v[w:]) * 1e3 for v in (enc_t, dec_t, enc_c, dec_c)]
print("RESULT " + json.dumps(out))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="mimi", help="preset name (default: mimi, 79 M)")
    parser.add_argument("--weights", type=Path, help="checkpoint (default: seeded random)")
    flags.add_batch(parser)
    parser.add_argument("--frames", type=int, default=20, help="timed frames per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    flags.add_reference(parser, "PyPI moshi")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat ours (then the reference) R times"
    )
    parser.add_argument(
        "--cpu-forms",
        default="auto",
        help="faster exact CPU forms (moshi_grpc/models/cpu_fast.py): auto = each where a "
        "measurement at load says it is faster (default), on, off (the plain model), or the "
        "forms to turn on, comma-separated: conv-matmul,onednn-packed,rows,fast-search,"
        "codebook-tables",
    )
    parser.add_argument(
        "--load",
        metavar="N/M,...",
        help="instead: tick time of N sessions on an M-slot replica vs N slots (e.g. "
        "1/1,1/16,4/4,4/16)",
    )
    parser.add_argument(
        "--buckets",
        type=int,
        metavar="M",
        help="instead: time every bucket of an M-slot replica (eager, and CUDA graphs on CUDA)",
    )
    parser.add_argument(
        "--sessions",
        help="with --buckets: comma-separated session counts (default: every bucket)",
    )
    parser.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=["auto", "on", "off", "both"],
        help="with --buckets: auto = both on CUDA, off elsewhere",
    )


def _load(args, weights: Path | None) -> Any:
    """The model as the bench runs it: on CPU with the CPU forms `--cpu-forms` asks for
    (printed)."""
    import torch

    from moshi_grpc.models.cpu_fast import MimiForms, prepare_mimi_for_cpu
    from moshi_grpc.models.mimi import load_mimi

    mimi = load_mimi(
        weights, device=args.device, dtype=getattr(torch, args.dtype),
        num_codebooks=args.num_codebooks, config=args.config,
    )  # fmt: skip
    if mimi.device.type == "cpu":
        forms = prepare_mimi_for_cpu(mimi, MimiForms.parse(args.cpu_forms))
        print(f"CPU forms ({args.cpu_forms}): {forms}", flush=True)
    return mimi


def _ours(args, weights: Path | None, batches: list[int]) -> dict[int, tuple[float, ...]]:
    import torch

    from moshi_grpc.models.cpu_fast import mimi_exact_reruns
    from moshi_grpc.services.common.device import synchronize

    mimi = _load(args, weights)

    def sync() -> None:
        synchronize(mimi.device)

    out = {}
    g = torch.Generator().manual_seed(0)
    for b in batches:
        n = args.warmup + args.frames
        pcm = (0.1 * torch.randn(b, n * FRAME, generator=g)).to(args.device)
        enc, dec = mimi.streaming_encoder(b), mimi.streaming_decoder(b)
        enc_t, dec_t, enc_c, dec_c, codes = [], [], [], [], []
        for i in range(n):
            sync()
            c0, t = time.process_time(), time.perf_counter()
            codes.append(enc.step(pcm[:, i * FRAME : (i + 1) * FRAME]))
            sync()
            enc_t.append(time.perf_counter() - t)
            enc_c.append(time.process_time() - c0)
        for i in range(n):
            sync()
            c0, t = time.process_time(), time.perf_counter()
            dec.step(codes[i])
            sync()
            dec_t.append(time.perf_counter() - t)
            dec_c.append(time.process_time() - c0)
        w = args.warmup
        out[b] = tuple(statistics.median(v[w:]) * 1e3 for v in (enc_t, dec_t, enc_c, dec_c))
    reruns = mimi_exact_reruns(mimi)
    levels = len(batches) * (args.warmup + args.frames) * args.num_codebooks
    print(f"codebook search: {reruns} of {levels} levels (batched calls) rerun exactly (near-ties)")
    return out


def _reference(args, weights: Path, batches: list[int]) -> dict[int, tuple[float, ...]]:
    cfg = dict(
        weights=str(weights), threads=args.threads, batches=batches, frames=args.frames,
        warmup=args.warmup, num_codebooks=args.num_codebooks,
    )  # fmt: skip
    proc = subprocess.run(
        [args.reference, "-c", _REFERENCE_SCRIPT, json.dumps(cfg)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"reference run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {int(k): tuple(v) for k, v in json.loads(line[0][7:]).items()}


def _median_rounds(rounds: list[dict[int, tuple[float, ...]]]) -> dict[int, tuple[float, ...]]:
    """Per batch size and column, the median over rounds."""
    return {
        b: tuple(statistics.median(r[b][i] for r in rounds) for i in range(len(rounds[0][b])))
        for b in rounds[0]
    }


def _frame_ratio(ours: tuple[float, ...], ref: tuple[float, ...]) -> float:
    return (ours[0] + ours[1]) / (ref[0] + ref[1])


def _print_tables(
    ours: dict[int, tuple[float, ...]], ref: dict[int, tuple[float, ...]], threads: int
) -> None:
    head = f"{'batch':>5} {'enc ms':>8} {'dec ms':>8} {'RTF':>6} {'x RT':>6}"
    if ref:
        head += f" | {'ref enc':>8} {'ref dec':>8} {'ref RTF':>7} | {'enc ours/ref':>12} {'dec ours/ref':>12} {'frame ours/ref':>14}"
    print("wall clock (median ms per batched call):")
    print(head)
    for b in ours:
        e, d = ours[b][:2]
        rtf = (e + d) / (b * FRAME_MS)  # compute time per second of audio (enc + dec)
        row = f"{b:>5} {e:8.2f} {d:8.2f} {rtf:6.3f} {1 / rtf:6.2f}"
        if ref:
            re_, rd = ref[b][:2]
            rrtf = (re_ + rd) / (b * FRAME_MS)
            row += f" | {re_:8.2f} {rd:8.2f} {rrtf:7.3f} | {e / re_:12.3f} {d / rd:12.3f} {rtf / rrtf:14.3f}"
        print(row)
    print(f"process CPU time (median ms per call, all {threads} threads summed):")
    for b in ours:
        e, d = ours[b][2:]
        row = f"{b:>5} {e:8.2f} {d:8.2f}"
        if ref:
            re_, rd = ref[b][2:]
            row += f" | ref {re_:8.2f} {rd:8.2f} | ours/ref {e / re_:6.3f} {d / rd:6.3f}"
        print(row)


# -- serving: compute follows load, per-bucket timings ----------------------------------------


@dataclass(frozen=True)
class CodecBucketTiming:
    """`sessions` live sessions on a codec replica, each with a frame every tick (encode of
    their pcm, then decode of the codes), stepped in `bucket` rows: ms p50 and p99."""

    sessions: int
    bucket: int
    graphs: bool
    encode_ms: tuple[float, float]
    decode_ms: tuple[float, float]
    tick_ms: tuple[float, float]  # encode + decode of the same tick
    state_mib_per_slot: float  # conv caches + KV rings + position, encoder + decoder


def codec_runners(mimi: Any, num_slots: int, graphs: bool = False) -> tuple[Any, Any]:
    """The engine's encode and decode runners over fresh `num_slots`-row streamers."""
    import torch

    from moshi_grpc.services.codec.engine import StreamerRunner

    enc = StreamerRunner(
        mimi.streaming_encoder(num_slots), num_slots, (mimi.frame_size,), torch.float32,
        graphs=graphs,
    )  # fmt: skip
    dec = StreamerRunner(
        mimi.streaming_decoder(num_slots), num_slots, (mimi.num_codebooks,), torch.long,
        graphs=graphs,
    )  # fmt: skip
    return enc, dec


def state_bytes_per_slot(streamer: Any) -> int:
    """Bytes of one row of a Mimi streamer's state (0 for the echo stand-in)."""
    if not hasattr(streamer, "state_tensors"):
        return 0
    return sum(t[0].numel() * t.element_size() for t in streamer.state_tensors())


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _time_ticks(
    mimi: Any,
    enc: Any,
    dec: Any,
    sessions: int,
    ticks: int,
    warmup: int,
    seed: int,
    cpu_out: list[float] | None = None,
) -> tuple[list[float], list[float], int]:
    """ms of encode and decode per tick, `sessions` streams joined (then left) on the
    runners, every one with a frame each tick (`cpu_out` gets process CPU ms per tick), and
    the bucket the runners stepped."""
    import torch

    g = torch.Generator().manual_seed(seed)
    slots = list(range(sessions))
    for s in slots:
        enc.join(s, None)
        dec.join(s, None)
    enc_ms, dec_ms, cpu_ms = [], [], []
    bucket = 0
    try:
        for i in range(warmup + ticks):
            pcm = list((0.1 * torch.randn(sessions, mimi.frame_size, generator=g)).unbind(0))
            c0, t0 = time.process_time(), time.perf_counter()
            codes, bucket = enc.run(slots, pcm)
            t1 = time.perf_counter()
            dec.run(slots, codes)
            t2, c2 = time.perf_counter(), time.process_time()
            if i >= warmup:
                enc_ms.append((t1 - t0) * 1e3)
                dec_ms.append((t2 - t1) * 1e3)
                cpu_ms.append((c2 - c0) * 1e3)
    finally:
        for s in slots:
            enc.leave(s)
            dec.leave(s)
    if cpu_out is not None:
        cpu_out.extend(cpu_ms)
    return enc_ms, dec_ms, bucket


def time_codec_buckets(
    device: str = "cuda",
    dtype: str = "bfloat16",
    num_slots: int = 128,
    sessions: Sequence[int] | None = None,
    graphs: Sequence[bool] = (False, True),
    ticks: int = 30,
    warmup: int = 3,
    config: str = "mimi",
    num_codebooks: int = 8,
    seed: int = 0,
    mimi: Any = None,
    cpu_forms: str = "auto",
) -> list[CodecBucketTiming]:
    """Per session count (default: every bucket of the ladder of `num_slots`) and per mode
    (eager, CUDA graphs): encode, decode and tick p50/p99 of that many sessions on a
    `num_slots`-row replica, through the engine's runners (as served: host input assembly,
    the step, the copy back). Like the service at load, every bucket used is stepped (in
    graph mode: captured) first. `mimi`: a model already built (else a seeded random one of
    `config` on device/dtype, with the CPU forms `cpu_forms` on CPU)."""
    import torch

    from moshi_grpc.models.cpu_fast import MimiForms, prepare_mimi_for_cpu
    from moshi_grpc.models.mimi import load_mimi
    from moshi_grpc.services.common.buckets import bucket_for, bucket_ladder

    if mimi is None:
        mimi = load_mimi(
            None, device=device, dtype=getattr(torch, dtype), num_codebooks=num_codebooks,
            config=config, seed=seed,
        )  # fmt: skip
        if mimi.device.type == "cpu":
            prepare_mimi_for_cpu(mimi, MimiForms.parse(cpu_forms))
    ladder = bucket_ladder(num_slots)
    counts = list(sessions or ladder)
    used = sorted({bucket_for(n, ladder) for n in counts})
    out = []
    for use_graphs in graphs:
        enc, dec = codec_runners(mimi, num_slots, graphs=use_graphs)
        state = (state_bytes_per_slot(enc.streamer) + state_bytes_per_slot(dec.streamer)) / 2**20
        with torch.inference_mode():
            for b in used:  # at load: every bucket stepped (and captured) once
                enc.warm_up(b)
                dec.warm_up(b)
        for n in counts:
            e, d, bucket = _time_ticks(mimi, enc, dec, n, ticks, warmup, seed)
            t = [x + y for x, y in zip(e, d)]
            out.append(
                CodecBucketTiming(
                    n,
                    bucket,
                    use_graphs,
                    (_pct(e, 0.5), _pct(e, 0.99)),
                    (_pct(d, 0.5), _pct(d, 0.99)),
                    (_pct(t, 0.5), _pct(t, 0.99)),
                    state,
                )  # fmt: skip
            )
        del enc, dec
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def format_codec_buckets(rows: Sequence[CodecBucketTiming]) -> str:
    lines = [
        f"{'sessions':>8} {'bucket':>6} {'graphs':>6} {'enc p50':>8} {'enc p99':>8} {'dec p50':>8} "
        f"{'dec p99':>8} {'tick p50':>9} {'tick p99':>9} {'MiB/slot':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.sessions:>8} {r.bucket:>6} {'on' if r.graphs else 'off':>6} {r.encode_ms[0]:8.2f} "
            f"{r.encode_ms[1]:8.2f} {r.decode_ms[0]:8.2f} {r.decode_ms[1]:8.2f} "
            f"{r.tick_ms[0]:9.2f} {r.tick_ms[1]:9.2f} {r.state_mib_per_slot:8.2f}"
        )
    return "\n".join(lines)


def _parse_load(spec: str) -> list[tuple[int, int]]:
    pairs = []
    for item in spec.split(","):
        n, _, m = item.strip().partition("/")
        pairs.append((int(n), int(m)))
        if not 1 <= pairs[-1][0] <= pairs[-1][1]:
            raise ValueError(f"--load wants sessions/slots with 1 <= sessions <= slots: {item!r}")
    return pairs


def _run_load(args: argparse.Namespace) -> int:
    """Tick time of N sessions on M slots against N slots, rounds interleaved."""
    import torch

    try:
        pairs = _parse_load(args.load)
    except ValueError as exc:
        print(exc)
        return 2
    mimi = _load(args, args.weights)
    print(
        f"compute follows load: config={args.config} dtype={args.dtype} device={args.device} "
        f"threads={args.threads}, {args.frames} ticks (+{args.warmup} warm-up) x "
        f"{args.rounds} rounds, every session with a frame each tick"
    )
    runners = {}
    for n, m in pairs:
        if m not in runners:
            runners[m] = codec_runners(mimi, m)
            with torch.inference_mode():
                for b in runners[m][0].ladder:
                    if b >= n:
                        runners[m][0].warm_up(b)
                        runners[m][1].warm_up(b)
                        break
    results: dict[tuple[int, int], list[tuple[float, ...]]] = {p: [] for p in pairs}
    buckets: dict[tuple[int, int], int] = {}
    for r in range(args.rounds):
        for n, m in pairs if r % 2 == 0 else pairs[::-1]:
            enc, dec = runners[m]
            cpu: list[float] = []
            e, d, buckets[(n, m)] = _time_ticks(
                mimi, enc, dec, n, args.frames, args.warmup, seed=r, cpu_out=cpu
            )
            t = [x + y for x, y in zip(e, d)]
            results[(n, m)].append(tuple(statistics.median(v) for v in (e, d, t, cpu)))
    print(
        f"{'sessions':>8} {'slots':>5} {'bucket':>6} {'enc ms':>8} {'dec ms':>8} "
        f"{'tick ms':>8} {'CPU ms':>8} | {'tick vs slots=sessions':>22} {'CPU vs':>7}"
    )
    med = {
        p: tuple(statistics.median(x[i] for x in v) for i in range(4)) for p, v in results.items()
    }
    for n, m in pairs:
        e, d, t, c = med[(n, m)]
        base = med.get((n, n))
        ratio = f"{t / base[2]:22.3f} {c / base[3]:7.3f}" if base else f"{'-':>22} {'-':>7}"
        print(f"{n:>8} {m:>5} {buckets[(n, m)]:>6} {e:8.2f} {d:8.2f} {t:8.2f} {c:8.2f} | {ratio}")
    print(
        "tick ms = wall time of encode + decode of one tick, CPU ms = process CPU time of it "
        "(all threads; less distorted on a shared machine); medians per round, then over "
        "rounds. bucket = rows the model stepped; 'vs': against the replica sized to its load."
    )
    return 0


def _run_buckets(args: argparse.Namespace) -> int:
    mode = args.cuda_graphs
    cuda = str(args.device).startswith("cuda")
    if mode == "auto":
        mode = "both" if cuda else "off"
    if mode in ("on", "both") and not cuda:
        print("CUDA graphs need --device cuda")
        return 2
    graphs = {"off": (False,), "on": (True,), "both": (False, True)}[mode]
    rows = time_codec_buckets(
        device=args.device, dtype=args.dtype, num_slots=args.buckets, graphs=graphs,
        sessions=[int(n) for n in args.sessions.split(",")] if args.sessions else None,
        ticks=args.frames, warmup=args.warmup, config=args.config,
        num_codebooks=args.num_codebooks, cpu_forms=args.cpu_forms,
    )  # fmt: skip
    print(
        f"codec buckets: config={args.config} dtype={args.dtype} device={args.device} "
        f"slots={args.buckets} threads={args.threads}, {args.frames} ticks (+{args.warmup})"
    )
    print(format_codec_buckets(rows))
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from moshi_grpc.models.mimi import load_mimi, save_mimi

    if args.rounds < 1:
        print("--rounds must be >= 1")
        return 2
    torch.set_num_threads(args.threads)
    if args.load:
        return _run_load(args)
    if args.buckets:
        return _run_buckets(args)
    batches = [int(b) for b in args.batch.split(",") if b]
    tmp = None
    weights = args.weights
    if args.reference and weights is None:
        if args.config != "mimi":
            print("--reference needs the full config (the reference builds the 79 M model)")
            return 2
        # the same seeded random weights for both sides, in the official format
        tmp = tempfile.TemporaryDirectory()
        weights = Path(tmp.name) / "mimi-random.safetensors"
        save_mimi(load_mimi(None, config=args.config), weights)
    ours_rounds, ref_rounds = [], []
    try:
        print(
            f"Mimi streaming bench: config={args.config} dtype={args.dtype} device={args.device} "
            f"threads={args.threads} codebooks={args.num_codebooks} frames={args.frames} "
            f"(+{args.warmup} warm-up), "
            f"weights={'random' if args.weights is None else weights}"
            + (f", {args.rounds} rounds" if args.rounds > 1 else "")
        )
        for r in range(args.rounds):
            ours_rounds.append(_ours(args, weights, batches))
            if args.reference:
                ref_rounds.append(_reference(args, weights, batches))
            if args.rounds > 1:
                line = f"round {r + 1}: ours enc+dec " + ", ".join(
                    f"B{b} {sum(ours_rounds[-1][b][:2]):.1f} ms" for b in batches
                )
                if ref_rounds:
                    line += " | frame ours/ref " + ", ".join(
                        f"B{b} {_frame_ratio(ours_rounds[-1][b], ref_rounds[-1][b]):.3f}"
                        for b in batches
                    )
                print(line, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    ours = _median_rounds(ours_rounds)
    ref = _median_rounds(ref_rounds) if ref_rounds else {}
    if args.rounds > 1:
        print(f"medians over {args.rounds} rounds (each column on its own):")
    _print_tables(ours, ref, args.threads)
    print(
        "ms = median over frames after warm-up of one batched call (one 80 ms frame for every "
        "stream); RTF = (enc + dec) / (batch x 80 ms), lower is better; x RT = 1 / RTF; frame ours/ref = RTF / ref RTF, the whole "
        "frame (encode + decode) against the reference's. "
        "CPU time is less distorted than wall time when other processes share the cores."
    )
    sys.stdout.flush()
    return 0
