"""`moshi-grpc bench codec`: streaming Mimi, ms per 80 ms frame, encode and decode.

For each batch size, N streams advance one frame per call (our batched streaming API); the
figure is the median wall time of one call after warm-up, so "ms per frame" is per call for
the whole batch, and the real-time factor is N x 80 ms / that time.

`--reference` also runs the public reference package (PyPI `moshi`, in its own venv, so in a
subprocess with that venv's python) on the same weights file, in the same run, one
configuration after the other (never concurrently), and prints ours / reference.

It also prints how many codebook levels the fast nearest-centroid search handed back to the
exact path (near-ties; see `_FastSearch` in moshi_grpc/models/mimi.py).

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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--batch", default="1,4,8", help="comma-separated batch sizes")
    parser.add_argument("--frames", type=int, default=20, help="timed frames per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", action="store_true", help="also time PyPI moshi")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat ours (then the reference) R times"
    )
    parser.add_argument(
        "--reference-python",
        default=os.environ.get("MOSHI_REFERENCE_PYTHON", ".venv-reference/bin/python"),
        help="python of a venv with PyPI moshi (../shared/tools/reference-venv makes one)",
    )


def _ours(args, weights: Path | None, batches: list[int]) -> dict[int, tuple[float, ...]]:
    import torch

    from moshi_grpc.models.mimi import load_mimi

    dtype = getattr(torch, args.dtype)
    mimi = load_mimi(
        weights, device=args.device, dtype=dtype, num_codebooks=args.num_codebooks,
        config=args.config,
    )  # fmt: skip
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
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
    q = mimi.quantizer
    reruns = q.rvq_first.exact_reruns + q.rvq_rest.exact_reruns
    levels = len(batches) * (args.warmup + args.frames) * args.num_codebooks
    print(f"codebook search: {reruns} of {levels} levels (batched calls) rerun exactly (near-ties)")
    return out


def _reference(args, weights: Path, batches: list[int]) -> dict[int, tuple[float, ...]]:
    cfg = dict(
        weights=str(weights), threads=args.threads, batches=batches, frames=args.frames,
        warmup=args.warmup, num_codebooks=args.num_codebooks,
    )  # fmt: skip
    proc = subprocess.run(
        [args.reference_python, "-c", _REFERENCE_SCRIPT, json.dumps(cfg)],
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


def run(args: argparse.Namespace) -> int:
    import torch

    from moshi_grpc.models.mimi import load_mimi, save_mimi

    if args.rounds < 1:
        print("--rounds must be >= 1")
        return 2
    torch.set_num_threads(args.threads)
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
            f"(+{args.warmup} warm-up), weights={'random' if args.weights is None else weights}"
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
