"""`moshi-grpc bench services`: the codec and LM services under 1..16 concurrent sessions.

For each service and each session count N it starts a real in-process grpc.aio server on
loopback with N slots, runs N concurrent client sessions over a real channel (frame by
frame, each waiting for its reply, as the gateway does; as fast as the service allows),
and prints:

- frames/s through the service and the batch size the scheduler reached (mean / max);
- p50 / p99 per-frame service latency seen by the client (send -> reply);
- the model time of the same batch called directly through the model API (no gRPC, no
  scheduler: `step` on N active slots, median per call), the service's own model time
  per frame in the same run, and the overhead `wall time / model time in the service - 1`
  (gRPC + scheduling + clients; both measured in the same run, so machine noise hits both).
  Target: <= 10% at 8 sessions. Codec rows are per stage (Encode streams, Decode streams).

The clients run in the same process and event loop as the server, so their cost is counted
as overhead (pessimistic). Both sides are measured in the same run on the same machine; on
a shared CPU the figures are noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_SESSIONS = "1,2,4,8,16"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", choices=["codec", "lm", "both"], default="both")
    parser.add_argument(
        "--sessions", default=DEFAULT_SESSIONS, help="comma-separated concurrent session counts"
    )
    parser.add_argument("--frames", type=int, default=30, help="frames per session (timed)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames per session first")
    parser.add_argument(
        "--mimi-config", default="tiny", help="Mimi preset (tiny, or mimi = the 79M model)"
    )
    parser.add_argument("--lm-config", default="small", help="LM preset (small, tiny, mid, ...)")
    parser.add_argument("--model", choices=["real", "echo"], default="real")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="replica slots (--max-sessions) for every run (default: the session count); "
        "e.g. --sessions 1,4 --slots 16 shows what a larger replica costs the same load",
    )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _direct_ms(make_runner, n: int, payloads: list, calls: int, warmup: int) -> float:
    """Median ms of one batched model call with all n slots active (no gRPC, no scheduler).

    Runs on its own thread like the service's runner thread: on a loaded CPU, torch calls
    from the main thread and from a worker thread were seen to differ several-fold, which
    would make the comparison meaningless."""
    times: list[float] = []

    def work() -> None:
        runner = make_runner(n)
        for slot in range(n):
            runner.join(slot, None)
        for i in range(warmup + calls):
            t0 = time.perf_counter()
            runner.run(list(range(n)), payloads)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)

    thread = threading.Thread(target=work, name="direct-model")
    thread.start()
    thread.join()
    return statistics.median(times)


async def _timed_sessions(
    running: Any,
    n: int,
    frames: int,
    warmup: int,
    *,
    stub_type: Callable[[Any], Any],
    open_call: Callable[[Any, int], Awaitable[Any]],
    request: Callable[[int, int], Any],
    scheduler_of: Callable[[Any], Any],
) -> dict[str, Any]:
    """N concurrent streams against `running`, one request/reply round per frame; stops it.

    `open_call(stub, i)` opens session i's stream (open message sent), `request(t, i)` is
    its frame t, `scheduler_of(engine)` the scheduler whose busy time is the model time.
    The timed part starts once every session finished its warm-up frames."""
    import grpc

    latencies: list[float] = []
    batches: list[int] = []
    start_gate = asyncio.Event()
    ready = 0

    async def session(i: int, stub: Any) -> None:
        nonlocal ready
        call = await open_call(stub, i)
        for t in range(warmup + frames):
            if t == warmup:
                ready += 1
                if ready == n:
                    start_gate.set()
                await start_gate.wait()
            t0 = time.perf_counter()
            await call.write(request(t, i))
            out = await call.read()
            if t >= warmup:
                latencies.append((time.perf_counter() - t0) * 1000.0)
                batches.append(out.timing.batch_size)
        await call.done_writing()
        await call.code()

    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = stub_type(ch)
            tasks = [asyncio.ensure_future(session(i, stub)) for i in range(n)]
            await start_gate.wait()
            scheduler = scheduler_of(running.servicer.engine)
            busy0 = scheduler.busy_s
            t0 = time.perf_counter()
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - t0
            busy = scheduler.busy_s - busy0
    finally:
        await running.stop(0)
    return {"wall": wall, "busy": busy, "latencies": latencies, "batches": batches}


async def _codec_run(
    mimi, options_kw: dict, stage: str, n: int, frames: int, warmup: int
) -> dict[str, Any]:
    """N concurrent Encode (stage "encode") or Decode ("decode") streams."""
    import numpy as np

    from moshi_grpc.services.codec.engine import CodecOptions
    from moshi_grpc.services.codec.startup import start_codec_server
    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.v1 import codec_pb2, codec_pb2_grpc

    options = CodecOptions(max_sessions=options_kw.pop("slots", None) or n, **options_kw)
    running = await start_codec_server(
        ServerConfig(metrics_port=None), options, load_model=lambda: mimi
    )
    rng = np.random.default_rng(0)
    pcm = [(0.1 * rng.standard_normal(1920)).astype("<f4").tobytes() for _ in range(8)]
    k, card = mimi.num_codebooks, mimi.cardinality
    codes = [rng.integers(0, card, k).tolist() for _ in range(8)]

    def request(t: int, i: int):
        if stage == "encode":
            frame = codec_pb2.PcmFrame(index=t, pcm_f32le=pcm[(i + t) % len(pcm)])
            return codec_pb2.EncodeRequest(frame=frame)
        frame = codec_pb2.CodesFrame(index=t, codes=codes[(i + t) % len(codes)])
        return codec_pb2.DecodeRequest(frame=frame)

    async def open_call(stub, i: int):
        if stage == "encode":
            call = stub.Encode()
            await call.write(codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id=f"b{i}")))
        else:
            call = stub.Decode()
            await call.write(codec_pb2.DecodeRequest(open=codec_pb2.CodecOpen(session_id=f"b{i}")))
        return call

    return await _timed_sessions(
        running,
        n,
        frames,
        warmup,
        stub_type=codec_pb2_grpc.CodecStub,
        open_call=open_call,
        request=request,
        scheduler_of=lambda engine: engine.encoder if stage == "encode" else engine.decoder,
    )


async def _lm_run(lm_tok, options_kw: dict, n: int, frames: int, warmup: int) -> dict[str, Any]:
    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server
    from moshi_grpc.v1 import lm_pb2, lm_pb2_grpc

    lm = lm_tok[0]
    options = LmOptions(max_sessions=options_kw.pop("slots", None) or n, **options_kw)
    running = await start_lm_server(
        ServerConfig(metrics_port=None), options, load_model=lambda: lm_tok
    )
    card = int(lm.config.card)

    async def open_call(stub, i: int):
        call = stub.Step()
        await call.write(lm_pb2.StepRequest(open=lm_pb2.LmOpen(session_id=f"b{i}", seed=i)))
        return call

    def request(t: int, i: int):
        codes = [(i * 31 + t * 7 + k) % card for k in range(8)]
        return lm_pb2.StepRequest(frame=lm_pb2.UserCodes(index=t, codes=codes))

    return await _timed_sessions(
        running,
        n,
        frames,
        warmup,
        stub_type=lm_pb2_grpc.LMStub,
        open_call=open_call,
        request=request,
        scheduler_of=lambda engine: engine.scheduler,
    )


def _report(service: str, n: int, frames: int, run: dict[str, Any], direct_ms: float) -> str:
    lat = run["latencies"]
    fps = n * frames / run["wall"]
    tick_ms = run["wall"] * 1000.0 / frames
    model_in_service_ms = run["busy"] * 1000.0 / frames
    overhead = run["wall"] / run["busy"] - 1.0 if run["busy"] > 0 else float("nan")
    batches = run["batches"]
    return (
        f"{service:7s} {n:8d} {fps:9.1f} {statistics.mean(batches):6.2f} {max(batches):5d} "
        f"{_pct(lat, 0.5):8.2f} {_pct(lat, 0.99):8.2f} {direct_ms:10.2f} "
        f"{model_in_service_ms:10.2f} {tick_ms:10.2f} {overhead * 100:8.1f}%"
    )


HEADER = (
    "service sessions  frames/s  batch   max   p50 ms   p99 ms  direct ms  in-svc ms "
    "  wall ms  overhead"
)


def _bench_codec(args: argparse.Namespace, sessions: list[int], common: dict) -> None:
    import torch

    from moshi_grpc.services.codec.engine import CodecOptions, StreamerRunner, load_codec_model

    kw = dict(common, config=args.mimi_config)
    mimi = load_codec_model(CodecOptions(**kw))
    k = mimi.num_codebooks
    stages = {
        "encode": (mimi.streaming_encoder, (mimi.frame_size,), torch.float32),
        "decode": (mimi.streaming_decoder, (k,), torch.long),
    }
    for stage, (streamer, shape, dtype) in stages.items():

        def make_runner(m: int, f=streamer, sh=shape, dt=dtype) -> StreamerRunner:
            return StreamerRunner(f(m), m, sh, dt)

        for n in sessions:
            if stage == "encode":
                payloads = [0.1 * torch.randn(mimi.frame_size) for _ in range(n)]
            else:
                payloads = [torch.randint(0, mimi.cardinality, (k,)) for _ in range(n)]
            direct = _direct_ms(make_runner, n, payloads, max(5, args.frames), args.warmup)
            run_kw = dict(kw, slots=args.slots)
            result = asyncio.run(_codec_run(mimi, run_kw, stage, n, args.frames, args.warmup))
            print(_report(stage, n, args.frames, result, direct), flush=True)


def _bench_lm(args: argparse.Namespace, sessions: list[int], common: dict) -> None:
    import torch

    from moshi_grpc.services.lm.engine import (
        GenRunner,
        JoinPayload,
        LmOptions,
        StepInput,
        load_lm_model,
        make_generator,
    )

    kw = dict(common, config=args.lm_config)
    lm_tok = load_lm_model(LmOptions(**kw))
    lm = lm_tok[0]
    cfg = lm.config
    n_user = int(cfg.num_user_streams)

    class _Runner(GenRunner):
        """Sessions joined with the server's default sampling, seed = slot."""

        def join(self, slot, payload):
            super().join(slot, JoinPayload(None, slot))

    def make_runner(m: int) -> _Runner:
        return _Runner(make_generator(kw["model"], lm, m), m, False)

    for n in sessions:
        inputs = [StepInput(torch.randint(0, int(cfg.card), (n_user,))) for _ in range(n)]
        direct = _direct_ms(make_runner, n, inputs, max(5, args.frames), args.warmup)
        run_kw = dict(kw, slots=args.slots)
        result = asyncio.run(_lm_run(lm_tok, run_kw, n, args.frames, args.warmup))
        print(_report("lm", n, args.frames, result, direct), flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    logging.getLogger("moshi_grpc").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
    if not sessions or min(sessions) < 1:
        print("--sessions needs positive integers")
        return 2
    if args.slots is not None and args.slots < max(sessions):
        print(f"--slots {args.slots} is below the largest session count {max(sessions)}")
        return 2
    print(
        f"bench services: model={args.model} mimi={args.mimi_config} lm={args.lm_config} "
        f"device={args.device} threads={args.threads} frames/session={args.frames} "
        f"max_wait_ms={args.max_wait_ms} slots={args.slots or 'sessions'}"
    )
    print(
        "direct ms: median batched model call with the same batch through the model API; "
        "in-svc ms: the service's own model time per frame in the run;"
    )
    print(
        "wall ms: run wall time per frame; overhead = wall / in-service model time - 1 "
        "(gRPC + scheduling + the in-process clients)"
    )
    common = {"max_wait_ms": args.max_wait_ms, "device": args.device, "model": args.model}
    if args.service in ("codec", "both"):
        print()
        print(HEADER)
        _bench_codec(args, sessions, common)
    if args.service in ("lm", "both"):
        print()
        print(HEADER)
        _bench_lm(args, sessions, common)
    return 0
