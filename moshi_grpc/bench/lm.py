"""`moshi-grpc bench lm`: Moshi LM milliseconds per step at several batch sizes.

Builds the `mid` config (dim 1024, 12 layers, depformer 512 x 4 layers, real vocabularies)
with seeded random weights saved under the official tensor names, then times `LMGen.step`
(median after warm-up) at each batch size with the ring KV cache already holding `--fill`
past steps (default: the whole 3000-step context, the steady state of a long conversation).
The model runs with the CPU forms `--cpu-forms` asks for (moshi_grpc/models/cpu_fast.py;
default auto: each where a measurement at load says it is faster here); the run prints which.

`--reference` runs the public reference (`moshi` 0.2.13, in its own venv) on the same weights
file in a subprocess during the same run, prints its figures beside ours with the ratio, and
checks that greedy tokens from a fresh session are identical. The reference attends over its
whole ring at every step, so its cost does not depend on the fill and it is timed from a fresh
state. CUDA is untested here (no GPU on the development machine).

Reading the figures: ours and the reference alternate in rounds so both see the same machine
load. On a machine whose cores are busy with other work, every thread-pool region waits for
a descheduled thread, so with `--threads 2` wall times there measure scheduling more than
compute (and process CPU time then includes spin-waiting); `--threads 1` gives the
load-robust comparison of the work each implementation does.
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

from moshi_grpc.bench import flags
from moshi_grpc.bench.flags import DEFAULT_REFERENCE  # noqa: F401 - its old home

_REFERENCE_SCRIPT = r"""
import json, os, sys, time
os.environ.setdefault("NO_TORCH_COMPILE", "1")
import torch
from moshi.models.lm import LMGen
from moshi.models.loaders import get_moshi_lm
job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"])
lm = get_moshi_lm(job["weights"], lm_kwargs=job["config"], device="cpu",
                  dtype=getattr(torch, job["dtype"]))
codes = torch.tensor(job["check_codes"])
greedy = []
gen = LMGen(lm, use_sampling=False, temp=0.0, temp_text=0.0)
with gen.streaming(1), torch.no_grad():
    for t in range(codes.shape[0]):
        r = gen.step(codes[t][None, :, None])
        greedy.append(None if r is None else r[0, :, 0].tolist())
print("READY " + json.dumps(greedy), flush=True)
# Commands on stdin: "B N" = time N more steps at batch B (a new B starts a new session).
cur_b, ctx, gen = None, None, None
g = torch.Generator().manual_seed(0)
for line in sys.stdin:
    b, n = map(int, line.split())
    if b != cur_b:
        if ctx is not None:
            ctx.__exit__(None, None, None)
        gen = LMGen(lm, use_sampling=True, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
        ctx = gen.streaming(b)
        ctx.__enter__()
        cur_b = b
    times = []
    with torch.no_grad():
        for _ in range(n):
            c = torch.randint(0, job["card"], (b, job["n_user"], 1), generator=g)
            t0, c0 = time.perf_counter(), time.process_time()
            gen.step(c)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    print("TIMES " + json.dumps(times), flush=True)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moshi_grpc.bench import prompt

    parser.add_argument("--config", default="mid", help="LM preset or config.json (default mid)")
    prompt.add_arguments(parser)
    flags.add_batch(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    parser.add_argument(
        "--fill", type=int, default=None, help="past steps in the KV cache (default: context)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cpu-forms",
        default="auto",
        help="faster CPU forms of the LM's layers (models/cpu_fast.py): auto = where a "
        "measurement at load says they are faster (default), on, off (the plain model), or "
        "the forms to turn on, comma-separated: packed-linear,attend-columns,kv-f32-f16",
    )
    flags.add_reference(parser)
    parser.add_argument("--check-steps", type=int, default=8, help="greedy parity steps")
    parser.add_argument(
        "--reference-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="dtype of the reference run (default: same as --dtype)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternations ours/reference per batch size"
    )
    parser.add_argument(
        "--replay",
        type=int,
        default=None,
        metavar="STEPS",
        help="instead: time a failover replay of a STEPS-step history by prefill against "
        "the step-by-step forced path",
    )
    parser.add_argument(
        "--replay-sample",
        type=int,
        default=300,
        metavar="STEPS",
        help="step-by-step steps actually timed for --replay, scaled to the whole history "
        "(a lower bound of its cost: later steps attend over more entries; default 300)",
    )


def fake_history(gen, fill: int, seed: int = 0, kv: bool = True) -> None:
    """Put every row `fill` steps into a conversation: random past keys/values and tokens.

    Drawn on the generator's device, in place: a whole-cache draw on the host is ~1.5 GiB
    per 7B session to generate and copy. `kv=False` refills only the counters and the token
    rings (after a CUDA graph capture stepped the rows: the cache's contents do not matter
    for timing, only that every entry is attended)."""
    import torch

    cfg = gen.lm.config
    dev = gen.device
    g = torch.Generator(device=dev).manual_seed(seed)
    for row in range(gen.num_rows):
        gen.reset(row, seed=row)
    gen.steps[:] = fill
    gen.host_steps[:] = [fill] * gen.num_rows
    if kv:
        for buf in (*gen.cache.k, *gen.cache.v):
            buf.normal_(0.0, 0.5, generator=g)
    shape = gen.tokens[:, :1].shape
    text = torch.randint(0, cfg.text_card, shape, generator=g, device=dev)
    audio = torch.randint(0, cfg.card, gen.tokens[:, 1:].shape, generator=g, device=dev)
    gen.tokens[:] = torch.cat([text, audio], 1)


class _Ours:
    """Our generator at one batch size, prefilled, stepping on request."""

    def __init__(self, lm, batch: int, fill: int) -> None:
        import torch

        from moshi_grpc.models.lm_gen import LMGen

        self.lm = lm
        self.batch = batch
        self.gen = LMGen(lm, batch)
        fake_history(self.gen, fill)
        self.rng = torch.Generator().manual_seed(batch)

    def times(self, n: int) -> list[tuple[float, float]]:
        """(wall, process CPU) seconds of each of `n` steps."""
        import torch

        cfg = self.lm.config
        out = []
        for _ in range(n):
            codes = torch.randint(
                0, cfg.card, (self.batch, cfg.num_user_streams), generator=self.rng
            )
            t0, c0 = time.perf_counter(), time.process_time()
            self.gen.step(codes)
            if self.lm.device.type == "cuda":
                torch.cuda.synchronize(self.lm.device)
            out.append((time.perf_counter() - t0, time.process_time() - c0))
        return out


class _Reference:
    """The reference package in its own process, stepping on request (see _REFERENCE_SCRIPT)."""

    def __init__(self, python: str, tmp: Path, job: dict) -> None:
        (tmp / "job.json").write_text(json.dumps(job))
        (tmp / "ref.py").write_text(_REFERENCE_SCRIPT)
        env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS=str(job["threads"]))
        self.proc = subprocess.Popen(
            # cwd is tmp: a relative interpreter path must be resolved against ours first
            [
                os.path.abspath(python) if os.sep in python else python,
                str(tmp / "ref.py"),
                str(tmp / "job.json"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp,
        )
        self.greedy = json.loads(self._expect("READY "))

    def _expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :]
        raise RuntimeError(f"reference process ended (rc {self.proc.wait()}); see its stderr")

    def times(self, batch: int, n: int) -> list[list[float]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{batch} {n}\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("TIMES "))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _greedy_ours(lm, codes) -> list:
    from moshi_grpc.models.lm_gen import LMGen, SamplingConfig

    gen = LMGen(lm, 1)
    gen.reset(0, SamplingConfig.greedy(), seed=0)
    out = []
    for t in range(codes.shape[0]):
        r = gen.step(codes[t][None])
        out.append([int(r.text[0])] + r.audio[0].tolist() if bool(r.ready[0]) else None)
    return out


def _median_ms(times, which: int = 0) -> float:
    """Median of the wall (0) or process-CPU (1) seconds, in ms."""
    return statistics.median(t[which] for t in times) * 1e3


def run_replay(lm, steps: int, sample: int, chunk: int = 256) -> dict[str, float]:
    """Seconds to rebuild a `steps`-step history onto a fresh row: by prefill, and step by
    step with forced tokens (timed on `sample` steps, scaled to `steps`)."""
    import torch

    from moshi_grpc.models.lm_gen import LMGen, SamplingConfig

    cfg = lm.config
    g = torch.Generator().manual_seed(0)
    user = torch.randint(0, cfg.card, (steps, cfg.num_user_streams), generator=g)
    text = torch.randint(0, cfg.text_card, (steps,), generator=g)
    audio = torch.randint(0, cfg.card, (steps, cfg.dep_q), generator=g)
    cuda = lm.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(lm.device)) if cuda else (lambda: None)
    gen = LMGen(lm, 1)
    gen.reset(0, SamplingConfig(), seed=1)
    gen.prefill(0, user[:8], text[:8], audio[:8], chunk)  # warm-up
    gen.reset(0, SamplingConfig(), seed=1)
    sync()
    t0 = time.perf_counter()
    gen.prefill(0, user, text, audio, chunk)
    sync()
    prefill_s = time.perf_counter() - t0
    n = max(1, min(sample, steps))
    gen.reset(0, SamplingConfig(), seed=1)
    force = torch.ones(1, dtype=torch.bool)
    t0 = time.perf_counter()
    for t in range(n):
        gen.step(user[t][None], force=force, force_text=text[t][None], force_audio=audio[t][None])
    sync()
    stepwise_s = (time.perf_counter() - t0) * steps / n
    return {"prefill_s": prefill_s, "stepwise_s": stepwise_s, "timed_steps": n}


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from moshi_grpc.models.cpu_fast import LMForms, prepare_lm_for_cpu
    from moshi_grpc.models.lm import load_lm

    try:
        LMForms.parse(args.cpu_forms)  # a bad name fails before any model is built
    except ValueError as exc:
        print(exc)
        return 2
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.prompt:
        from moshi_grpc.bench import prompt

        lm = load_lm(
            None, prompt.persona_config(args.config), device=args.device, dtype=dtype, seed=0
        )
        lm.config_name = args.config
        prepare_lm_for_cpu(lm, args.cpu_forms)
        prompt.report(lm, args, prompt.run_prompt(lm, args))
        return 0
    if args.replay is not None:
        lm = load_lm(None, args.config, device=args.device, dtype=dtype, seed=0)
        prepare_lm_for_cpu(lm, args.cpu_forms)
        steps = min(args.replay, lm.config.context * 4)
        r = run_replay(lm, steps, args.replay_sample)
        print(
            f"Moshi LM replay: config {lm.config_name}, dtype {args.dtype}, device "
            f"{args.device}, {args.threads} threads, history {steps} steps"
        )
        print(f"  prefill (chunks of 256)      {r['prefill_s'] * 1e3:10.1f} ms")
        print(
            f"  step by step, forced tokens  {r['stepwise_s'] * 1e3:10.1f} ms"
            f"  (timed {r['timed_steps']} steps, scaled; a lower bound)"
        )
        print(f"  prefill speed-up             {r['stepwise_s'] / r['prefill_s']:10.1f}x")
        return 0
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    lm = load_lm(None, args.config, device=args.device, dtype=dtype, seed=0)
    forms = prepare_lm_for_cpu(lm, args.cpu_forms)
    cfg = lm.config
    fill = cfg.context if args.fill is None else min(args.fill, cfg.context)
    params = sum(p.numel() for p in lm.parameters())
    rounds = max(1, args.rounds)
    per_round = max(1, args.steps // rounds)
    print(
        f"Moshi LM bench: config {lm.config_name} ({params / 1e6:.0f} M params), "
        f"dtype {args.dtype}, device {args.device}, {args.threads} threads, "
        f"KV fill {fill}/{cfg.context} steps; median of {per_round * rounds} steps after "
        f"{args.warmup} warm-up" + (", interleaved with the reference" if args.reference else "")
    )
    on = [name for name, used in forms.items() if used]
    print(f"CPU forms ({args.cpu_forms}): {', '.join(on) if on else 'none (the plain model)'}")
    ours: dict[int, list[float]] = {}
    refs: dict[int, list[float]] = {}
    parity = None
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ref = None
        if args.reference:
            g = torch.Generator().manual_seed(7)
            codes = torch.randint(
                0, cfg.card, (args.check_steps, cfg.num_user_streams), generator=g
            )
            weights = tmp / "model.safetensors"
            state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
            save_file(state, str(weights))
            del state
            job = {
                "weights": str(weights),
                "config": {k: v for k, v in cfg.to_dict().items() if k not in cfg.extra},
                "dtype": args.reference_dtype or args.dtype,
                "threads": args.threads,
                "card": cfg.card,
                "n_user": cfg.num_user_streams,
                "check_codes": codes.tolist(),
            }
            ref = _Reference(args.reference, tmp, job)
            parity = _greedy_ours(lm, codes) == ref.greedy
        try:
            for b in batches:
                mine = _Ours(lm, b, fill)
                mine.times(args.warmup)
                if ref:
                    ref.times(b, args.warmup)
                ours[b], refs[b] = [], []
                # Alternate ours / reference so both see the same machine load.
                for _ in range(rounds):
                    ours[b] += mine.times(per_round)
                    if ref:
                        refs[b] += ref.times(b, per_round)
                del mine
        finally:
            if ref:
                ref.close()

    has_ref = bool(refs.get(batches[0]))
    print(
        "wall = median wall-clock ms per step; cpu = median process CPU ms per step (all "
        "threads, spin-waits included)"
    )
    header = f"{'batch':>5} {'ours wall':>10} {'ours cpu':>9} {'wall/session':>13}"
    if has_ref:
        header += f" {'ref wall':>9} {'ref cpu':>8} {'wall ours/ref':>14} {'cpu ours/ref':>13}"
    print(header)
    for b in batches:
        ow, oc = _median_ms(ours[b]), _median_ms(ours[b], 1)
        line = f"{b:>5} {ow:>10.1f} {oc:>9.1f} {ow / b:>13.1f}"
        if has_ref:
            rw, rc = _median_ms(refs[b]), _median_ms(refs[b], 1)
            line += f" {rw:>9.1f} {rc:>8.1f} {ow / rw:>14.2f} {oc / rc:>13.2f}"
        print(line)
    if parity is not None:
        print(
            f"greedy tokens vs reference ({args.check_steps} steps, fresh session, B=1, "
            f"ours {args.dtype} / reference {args.reference_dtype or args.dtype}): "
            + ("identical" if parity else "DIFFERENT")
            + (
                ""
                if parity or args.dtype == "float32"
                else " (expected outside fp32: half-precision rounding differs between"
                " implementations, so only fp32 parity is required)"
            )
        )
    sys.stdout.flush()
    return 0 if parity in (None, True) or args.dtype != "float32" else 1
