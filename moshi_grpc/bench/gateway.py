"""`moshi-grpc bench gateway`: latency the gateway adds per frame, at 1..N concurrent sessions.

Setup (all on loopback, each service its own process, as deployed): codec and LM services in
`--model echo` mode (zero model cost, `--max-wait-ms 0`), and one gateway per
`--backend-streams` mode in front of them (`mux`: shared multiplexed backend streams, the
default; `per-session`: three backend streams per session). This process is the load: N
sessions, each sending one 80 ms frame every 80 ms (real time, phases spread over the frame
period), measuring per frame

- gateway path: send of input frame t -> arrival of output frame t from the gateway;
- direct path (the baseline, same run, same N): the same frame driven by this process
  straight through the backends, Encode -> Step -> Decode pipelined like the gateway does
  it, over the `--direct` RPCs: by default the multiplexed ones (one shared stream per stage,
  the cheapest client there is: with per-session streams the load generator itself
  saturates a core at a few hundred sessions, and "added" then measures its queueing).

Gateway-added latency = gateway path - direct path (p50 and p99 of each, subtracted): the
backend time (queueing, batching, the echo model), the loopback hops to the backends and
this client's own stack are in both, so what is left is what the gateway's own work and its
extra hop cost. Every frame must come back (`lost` = sent - received, and the gateway's
summaries must show no late or dropped frame). `gw CPU/frame` is the gateway process's
user + system CPU time over the level divided by the frames it returned: the least noisy
figure on a shared machine (dropped frames, `drop`, cost the gateway less: compare it only
between rows without drops). The codec + LM CPU per frame is printed too (the backend
streams' cost on the backends: per-session streams cost them more than mux ones). Bounded: `--seconds` of audio per session, a timeout per level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

FRAME_S = 0.08


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sessions", default="1,50,200", help="comma-separated concurrent session counts"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per session")
    parser.add_argument(
        "--rate", type=int, default=24000, help="client sample rate (24000: no resampling)"
    )
    parser.add_argument(
        "--encoding",
        choices=["pcm16", "float32", "mulaw", "alaw", "opus"],
        default="pcm16",
        help="client wire encoding (opus: each session one Ogg Opus stream each way; with "
        "--rate 8000/12000/16000/24000/48000); compare `gw CPU/frame` between encodings",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="alternating gateway/direct rounds per level (samples are pooled)",
    )
    parser.add_argument(
        "--no-direct", action="store_true", help="skip the direct-to-backends baseline"
    )
    parser.add_argument(
        "--backend-streams",
        default="mux",
        help="gateway backend stream modes to measure, comma-separated: mux, per-session "
        "(one gateway process per mode, measured in the same run)",
    )
    parser.add_argument(
        "--direct",
        choices=["mux", "per-session"],
        default="mux",
        help="backend RPCs of the direct baseline (mux: shared streams, a cheap client)",
    )
    parser.add_argument(
        "--gateway-cpus",
        default=None,
        help="pin the gateway process to these CPUs (taskset list, e.g. 0,1)",
    )
    parser.add_argument(
        "--load-cpus",
        default=None,
        help="pin this load generator to these CPUs (e.g. 1; with --gateway-cpus 0 the "
        "gateway has a core of its own)",
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="gateway processes on the one port (`gateway --workers N`); CPU is summed over "
        "all of them",
    )
    parser.add_argument(
        "--gateway-args",
        default="",
        metavar="ARGS",
        help='extra flags for the gateway process(es), one string (e.g. "--max-backlog-frames 4")',
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="PATH",
        help="run the gateway under cProfile and write the stats to PATH",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=120.0, help="give up on a level after this long"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    address: str
    proc: subprocess.Popen


def _spawn(name: str, extra: list[str], prefix: list[str] | None = None) -> Proc:
    port = _free_port()
    cmd = [
        *(prefix or []),
        sys.executable,
        *(["-m", "cProfile", "-o", extra.pop(0)] if name == "gateway-profiled" else []),
        "-m",
        "moshi_grpc.cli",
        "--log-level",
        "WARNING",
        name.split("-")[0],
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Proc(name, f"127.0.0.1:{port}", proc)


async def _wait_serving(p: Proc, timeout_s: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(p.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if p.proc.poll() is not None:
                err = p.proc.stderr.read().decode(errors="replace") if p.proc.stderr else ""
                raise RuntimeError(f"{p.name} exited: {err[-2000:]}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{p.name} not serving after {timeout_s} s")


def _stop(procs: list[Proc]) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process and its live descendants (Linux /proc: the
    gateway's workers with --gateway-workers), 0 when unavailable."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        children = []
    return own + sum(_cpu_seconds(int(c)) for c in children)


@dataclass
class LevelResult:
    latencies_ms: list[float] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    late: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    gateway_cpu_s: float = 0.0
    backend_cpu_s: float = 0.0  # codec + LM processes
    wall_s: float = 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def _paced_frames(n_frames: int, phase_s: float, send) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time() + phase_s
    for t in range(n_frames):
        delay = start + t * FRAME_S - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(t)


async def _gateway_session(stub, args, frames: int, phase: float, chunks: list[bytes], res) -> None:
    """One session sending `chunks[t]` as input frame t (the same bytes for every session:
    for Ogg Opus one whole stream, which each session's own decoder reads)."""
    import grpc

    from moshi_grpc.clients.events import ENCODINGS
    from moshi_grpc.v1 import gateway_pb2

    enc = ENCODINGS[args.encoding]
    call = stub.Converse()
    await call.write(
        gateway_pb2.ConverseRequest(
            config=gateway_pb2.SessionConfig(
                sample_rate=args.rate, encoding=enc, budget_ms=5000, max_consecutive_misses=0
            )
        )
    )
    first = await call.read()
    if first is grpc.aio.EOF or not first.event.HasField("started"):
        res.errors.append(f"no SessionStarted: {await call.code()} {await call.details()}")
        return
    sent_at: dict[int, float] = {}
    requests = [gateway_pb2.ConverseRequest(audio=gateway_pb2.AudioChunk(data=c)) for c in chunks]

    async def send(t: int) -> None:
        sent_at[t] = time.perf_counter()
        if chunks[t]:  # (an Opus writer may hold a packet back: nothing to send then)
            await call.write(requests[t])
        res.sent += 1

    async def receive() -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            kind = msg.WhichOneof("kind")
            if kind == "audio":
                t = msg.audio.frame_index
                res.latencies_ms.append((time.perf_counter() - sent_at.pop(t)) * 1000.0)
                res.received += 1
            elif kind == "event" and msg.event.HasField("ended"):
                s = msg.event.ended.summary
                res.late += s.frames_late
                res.dropped += s.frames_dropped

    reader = asyncio.create_task(receive())
    try:
        await _paced_frames(frames, phase, send)
        await call.done_writing()
        await reader
        code = await call.code()
        if code != grpc.StatusCode.OK:
            res.errors.append(f"{code.name}: {await call.details()}")
    finally:
        reader.cancel()


async def _direct_session(replicas, mode: str, frames: int, phase: float, pcm: bytes, res) -> None:
    """The gateway's job done by hand, minimal: Encode -> Step -> Decode, pipelined, over
    per-session or shared multiplexed backend streams (the gateway's own stream classes)."""
    import grpc

    from moshi_grpc.services.gateway.moshi_pipeline import DECODE, ENCODE, STEP
    from moshi_grpc.services.gateway.streams import open_stream
    from moshi_grpc.v1 import codec_pb2, lm_pb2

    codec, lm = replicas
    enc = open_stream(codec, ENCODE, (), mode)
    dec = open_stream(codec, DECODE, (), mode)
    step = open_stream(lm, STEP, (), mode)
    await enc.open(codec_pb2.CodecOpen(session_id="bench"))
    await dec.open(codec_pb2.CodecOpen(session_id="bench"))
    await step.open(lm_pb2.LmOpen(session_id="bench"))
    sent_at: dict[int, float] = {}

    def done(t: int) -> None:
        res.latencies_ms.append((time.perf_counter() - sent_at.pop(t)) * 1000.0)
        res.received += 1

    async def send(t: int) -> None:
        sent_at[t] = time.perf_counter()
        await enc.send(codec_pb2.PcmFrame(index=t, pcm_f32le=pcm))
        res.sent += 1

    async def codes_to_lm() -> None:
        while (msg := await enc.read()) is not grpc.aio.EOF:
            await step.send(lm_pb2.UserCodes(index=msg.index, codes=msg.codes))
        await step.done_writing()

    decode_order: list[int] = []

    async def lm_to_decode() -> None:
        d = 0
        while (msg := await step.read()) is not grpc.aio.EOF:
            if msg.ready:
                decode_order.append(msg.index)
                await dec.send(codec_pb2.CodesFrame(index=d, codes=msg.moshi_codes))
                d += 1
            else:
                done(msg.index)
        await dec.done_writing()

    async def pcm_back() -> None:
        i = 0
        while (await dec.read()) is not grpc.aio.EOF:
            done(decode_order[i])
            i += 1

    tasks = [asyncio.create_task(c()) for c in (codes_to_lm, lm_to_decode, pcm_back)]
    try:
        await _paced_frames(frames, phase, send)
        await enc.done_writing()
        await asyncio.gather(*tasks)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        res.errors.append(f"direct: {exc!r}")
    finally:
        for t in tasks:
            t.cancel()
        for stream in (enc, dec, step):
            if not stream.done():
                stream.close()


class _Target:
    """What the gateway's stream classes need of a replica: a stub, an address, and the
    place for its shared mux streams (fresh per level, so levels do not share state)."""

    def __init__(self, stub, address: str) -> None:
        self.stub = stub
        self.address = address
        self.mux: dict = {}

    def close(self) -> None:
        for stream in self.mux.values():
            stream.close()
        self.mux.clear()


async def _level(
    n: int,
    frames: int,
    make_session,
    timeout_s: float,
    gateway_pid: int | None = None,
    res: LevelResult | None = None,
    backend_pids: tuple[int, ...] = (),
) -> LevelResult:
    """Run n sessions at once (phases spread over a frame period); adds into `res`."""
    res = res or LevelResult()
    rng = np.random.default_rng(n + len(res.latencies_ms))
    phases = rng.uniform(0, FRAME_S, size=n)
    cpu0 = _cpu_seconds(gateway_pid) if gateway_pid else 0.0
    backend0 = sum(_cpu_seconds(pid) for pid in backend_pids)
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(make_session(float(p), res)) for p in phases]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    res.wall_s += time.perf_counter() - t0
    if gateway_pid:
        res.gateway_cpu_s += _cpu_seconds(gateway_pid) - cpu0
    res.backend_cpu_s += sum(_cpu_seconds(pid) for pid in backend_pids) - backend0
    for t in pending:
        t.cancel()
        res.errors.append("timeout")
    for t in done:
        if t.exception() is not None:
            res.errors.append(repr(t.exception()))
    return res


async def _main(args: argparse.Namespace) -> int:
    import grpc

    from moshi_grpc import audio
    from moshi_grpc.v1 import codec_pb2_grpc, gateway_pb2_grpc, lm_pb2_grpc

    levels = [int(x) for x in args.sessions.split(",") if x.strip()]
    modes = [m.strip() for m in args.backend_streams.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("mux", "per-session")]
    if unknown or not modes:
        print(f"--backend-streams: expected mux and/or per-session, got {args.backend_streams!r}")
        return 2
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",") if c.strip()})
    slots = max(levels)
    frames = max(1, int(round(args.seconds / FRAME_S)))
    backend = ["--model", "echo", "--max-sessions", str(slots), "--max-wait-ms", "0"]
    codec = _spawn("codec", list(backend))
    lm = _spawn("lm", list(backend))
    procs = [codec, lm]
    try:
        await asyncio.gather(_wait_serving(codec), _wait_serving(lm))
        gateways = {}
        for mode in modes:
            gw_extra = ["--codec-addr", codec.address, "--lm-addr", lm.address, "--grace", "5"]
            gw_extra += ["--max-concurrent-rpcs", "0", "--backend-streams", mode]
            gw_extra += ["--workers", str(max(1, args.gateway_workers))]
            gw_extra += shlex.split(args.gateway_args)
            prefix = ["taskset", "-c", args.gateway_cpus] if args.gateway_cpus else None
            name = "gateway"
            if args.profile:
                name = "gateway-profiled"
                gw_extra.insert(0, f"{args.profile}.{mode}" if len(modes) > 1 else args.profile)
            gateways[mode] = _spawn(name, gw_extra, prefix)
            procs.insert(0, gateways[mode])
        await asyncio.gather(*(_wait_serving(g) for g in gateways.values()))
        n_samples = int(round(FRAME_S * args.rate))
        signal_24k = audio.speech_like(FRAME_S, 24000, seed=0)
        # Input frame t of every session: 80 ms of a voice-like signal in the wire encoding.
        encoder = audio.StreamEncoder(args.encoding, args.rate)
        voice = audio.speech_like(frames * FRAME_S, args.rate, seed=0)
        chunks = [encoder.encode(voice[t * n_samples : (t + 1) * n_samples]) for t in range(frames)]
        pcm = audio.array_to_f32le(signal_24k[: audio.FRAME_SIZE])
        options = [("grpc.max_receive_message_length", 4 << 20)]
        rows = []
        async with (
            grpc.aio.insecure_channel(codec.address, options=options) as cch,
            grpc.aio.insecure_channel(lm.address, options=options) as lch,
        ):
            cstub = codec_pb2_grpc.CodecStub(cch)
            lstub = lm_pb2_grpc.LMStub(lch)
            backend_pids = (codec.proc.pid, lm.proc.pid)
            for n in levels:
                direct = None if args.no_direct else LevelResult()
                vias = {mode: LevelResult() for mode in modes}
                for _ in range(args.rounds):  # alternate: every path sees the same noise
                    for mode, gateway in gateways.items():
                        async with grpc.aio.insecure_channel(
                            gateway.address, options=options
                        ) as gch:
                            gstub = gateway_pb2_grpc.GatewayStub(gch)
                            await _level(
                                n,
                                frames,
                                lambda p, r, g=gstub: _gateway_session(
                                    g, args, frames, p, chunks, r
                                ),
                                args.timeout_s,
                                gateway.proc.pid,
                                vias[mode],
                                backend_pids,
                            )
                        await asyncio.sleep(1.0)  # the gateway re-polls Info before reuse
                    if direct is not None:
                        targets = (
                            _Target(cstub, codec.address),
                            _Target(lstub, lm.address),
                        )
                        try:
                            await _level(
                                n,
                                frames,
                                lambda p, r, t=targets: _direct_session(
                                    t, args.direct, frames, p, pcm, r
                                ),
                                args.timeout_s,
                                res=direct,
                                backend_pids=backend_pids,
                            )
                        finally:
                            for t in targets:
                                t.close()
                        await asyncio.sleep(1.0)
                for mode in modes:
                    rows.append((n, mode, vias[mode], direct))
    finally:
        _stop(procs)
    _print(args, frames, rows)
    bad = any(via.errors or via.sent != via.received for _, _, via, _ in rows)
    return 1 if bad else 0


def _print(args, frames: int, rows) -> None:
    print(f"command: {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(
        f"setup: codec + LM in --model echo (max-wait 0 ms), gateway(s), this load generator: "
        f"separate processes on {os.cpu_count()} CPU(s); {frames} frames per session at real "
        f"time, {args.rounds} alternating round(s), client {args.rate} Hz {args.encoding}; "
        f"direct baseline over {args.direct} backend streams"
        + (f"; gateway pinned to CPUs {args.gateway_cpus}" if args.gateway_cpus else "")
        + (f"; load generator pinned to CPUs {args.load_cpus}" if args.load_cpus else "")
        + (f"; {args.gateway_workers} gateway workers" if args.gateway_workers > 1 else "")
    )
    head = (
        f"{'sessions':>8} {'backend streams':>15} | {'gateway p50':>11} {'p99':>8} | "
        f"{'direct p50':>10} {'p99':>8} | {'added p50':>9} {'p99':>8} | {'gw CPU/frame':>12} | "
        f"{'sent':>6} {'recv':>6} {'lost':>5} {'late':>5} {'drop':>5}"
    )
    print(head)
    print("-" * len(head))
    for n, mode, via, direct in rows:
        d50 = direct.pct(50) if direct else float("nan")
        d99 = direct.pct(99) if direct else float("nan")
        cpu = via.gateway_cpu_s * 1e3 / via.received if via.received else float("nan")
        print(
            f"{n:>8} {mode:>15} | {via.pct(50):>9.2f}ms {via.pct(99):>6.2f}ms | {d50:>8.2f}ms "
            f"{d99:>6.2f}ms | {via.pct(50) - d50:>7.2f}ms {via.pct(99) - d99:>6.2f}ms | "
            f"{cpu:>10.3f}ms | {via.sent:>6} {via.received:>6} {via.sent - via.received:>5} "
            f"{via.late:>5} {via.dropped:>5}"
        )
        if via.wall_s:
            backends = via.backend_cpu_s * 1e3 / via.received if via.received else float("nan")
            direct_backends = (
                direct.backend_cpu_s * 1e3 / direct.received
                if direct and direct.received
                else float("nan")
            )
            print(
                f"{'':>26} gateway at {100 * via.gateway_cpu_s / via.wall_s:.0f}% of one core "
                f"over {via.wall_s:.1f} s; codec + LM CPU/frame {backends:.3f} ms "
                f"(direct: {direct_backends:.3f} ms)"
                + (
                    f"; direct lost {direct.sent - direct.received}"
                    if direct and direct.sent != direct.received
                    else ""
                )
            )
        for err in (via.errors + (direct.errors if direct else []))[:3]:
            print(f"         error: {err}")
    for mode in dict.fromkeys(mode for _, mode, _, _ in rows):
        fit = [
            (n, via)
            for n, m, via, direct in rows
            if m == mode
            and direct is not None
            and via.received == via.sent
            and not via.errors
            and via.pct(99) - direct.pct(99) <= 10.0
            and via.wall_s > 0
            and via.gateway_cpu_s > 0
        ]
        if fit:
            n, via = max(fit, key=lambda x: x[0])
            cores = via.gateway_cpu_s / via.wall_s
            print(
                f"{mode}: sessions per gateway core at p99 added <= 10 ms: {n / cores:.0f} "
                f"(largest such level {n} sessions, the gateway used {cores:.2f} cores)"
            )
        else:
            print(f"{mode}: no level with p99 added <= 10 ms (or no direct baseline)")
    print(
        "added = gateway path - direct path, per percentile. The direct path drives the same "
        "Encode -> Step -> Decode chain from this process straight to the backends "
        f"({args.direct} streams), so backend time (queueing, batching, echo model), the "
        "backend hops and the client's own cost are in both; what is left is the gateway's "
        "work and its extra hop. gw CPU/frame = gateway process CPU time / frames returned; "
        "codec + LM CPU/frame likewise for the two backend processes (their cost for the "
        "gateway's backend streams vs for the direct path's). "
        "Target: added p99 <= 2 ms at 200 sessions on 2 CPU cores."
    )


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))
