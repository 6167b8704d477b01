#!/usr/bin/env python3
"""Load and soak test of the whole stack through the public Converse API (loopback only).

Starts codec + LM + gateway as `moshi-grpc` subprocesses (or targets a running gateway with
--gateway), ramps up to --sessions concurrent Converse sessions that each stream audio in
real time (one 80 ms chunk every 80 ms), holds them for --duration seconds, then closes them
and checks the frame accounting of every session:

    frames sent == AudioOut frames received == summary.frames_in == summary.frames_out
    silence frames == late + dropped + (initial acoustic delay: LM steps not ready yet)

and prints sessions held, refusals, errors, per-frame latency percentiles (client-measured:
input chunk sent -> its output frame received), and the RSS growth of every server process
between the end of the ramp and the end of the hold (sampled every few seconds).

Phases: `echo` (zero-cost models: >= 200 sessions; measures the serving layer) and `small`
(the small random preset: tiny Mimi + small LM, real model compute: >= 8 sessions).

    python tools/loadtest.py                       # echo 200 sessions, 60 s; small 8, 30 s
    python tools/loadtest.py --duration 300        # 5-minute soak (both phases)
    python tools/loadtest.py --short               # CI: echo only, 50 sessions, ~15 s
    python tools/loadtest.py --json out.json       # also write the figures as JSON

Bounded on purpose: sessions <= 1000, duration <= 3600 s, loopback addresses only. Exit code
0 when every admitted session ended OK with 0 unaccounted frames and nothing crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FRAME = 1920
RATE = 24000
FRAME_S = FRAME / RATE
MAX_SESSIONS = 1000
MAX_DURATION_S = 3600.0
LOOPBACK = "127.0.0.1"


# ----------------------------------------------------------------------------- results


@dataclass
class SessionResult:
    """What one client session saw."""

    code: str = "UNSET"
    details: str = ""
    admitted: bool = False
    frames_sent: int = 0
    audio_out: int = 0
    silence: int = 0
    out_of_order: int = 0
    summary: dict = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def unaccounted(self) -> int:
        """Input frames without exactly one output frame, in order, matching the summary."""
        if not self.admitted or self.code != "OK":
            return 0
        missing = abs(self.frames_sent - self.audio_out) + self.out_of_order
        s = self.summary
        if s:
            missing += abs(s.get("frames_in", 0) - self.frames_sent)
            missing += abs(s.get("frames_out", 0) - self.audio_out)
        return missing

    @property
    def summary_missing(self) -> bool:
        """Ended OK without the SessionEnded event the contract promises."""
        return self.admitted and self.code == "OK" and not self.summary


# ----------------------------------------------------------------------------- client


def _pcm(seed: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.uniform(-0.3, 0.3, FRAME).astype("<f4").tobytes()


async def _session(
    stub, pb, sid: int, duration_s: float, budget_ms: int, metadata, chunks: list[bytes]
) -> SessionResult:
    import grpc

    res = SessionResult()
    call = stub.Converse(metadata=metadata, timeout=duration_s + 120)
    sent_at: dict[int, float] = {}
    try:
        await call.write(
            pb.ConverseRequest(
                config=pb.SessionConfig(
                    sample_rate=RATE,
                    encoding=pb.AUDIO_ENCODING_FLOAT32,
                    seed=sid,
                    budget_ms=budget_ms,
                    max_consecutive_misses=0,
                    client_id=f"loadtest-{sid}",
                )
            )
        )
        # Wait for SessionStarted before streaming: a refusal then arrives as a clean status
        # (writing while the server refuses can turn the status into a client-side INTERNAL).
        first = await call.read()
        if first is grpc.aio.EOF:
            raise RuntimeError("stream ended before SessionStarted")
        res.admitted = True
        expected_next = 0

        async def reader() -> None:
            nonlocal expected_next
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                kind = msg.WhichOneof("kind")
                if kind == "audio":
                    now = time.monotonic()
                    idx = msg.audio.frame_index
                    if idx != expected_next:
                        res.out_of_order += 1
                    expected_next = idx + 1
                    res.audio_out += 1
                    if msg.audio.silence:
                        res.silence += 1
                    t = sent_at.pop(idx, None)
                    if t is not None:
                        res.latencies_ms.append((now - t) * 1000.0)
                elif kind == "event" and msg.event.WhichOneof("kind") == "ended":
                    s = msg.event.ended.summary
                    res.summary = {
                        "frames_in": s.frames_in,
                        "frames_out": s.frames_out,
                        "frames_late": s.frames_late,
                        "frames_dropped": s.frames_dropped,
                        "reason": s.reason,
                    }

        read_task = asyncio.ensure_future(reader())
        t0 = time.monotonic()
        n = max(1, int(round(duration_s / FRAME_S)))
        for i in range(n):
            delay = t0 + i * FRAME_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if read_task.done():
                break
            sent_at[i] = time.monotonic()
            await call.write(pb.ConverseRequest(audio=pb.AudioChunk(data=chunks[i % len(chunks)])))
            res.frames_sent += 1
        await call.done_writing()
        await read_task
    except asyncio.CancelledError:
        call.cancel()
        raise
    except grpc.aio.AioRpcError:
        pass
    except Exception as exc:  # noqa: BLE001 - recorded as the session's outcome
        res.details = f"{type(exc).__name__}: {exc}"
    code = await call.code()
    res.code = code.name
    if code != grpc.StatusCode.OK:
        res.details = res.details or (await call.details()) or ""
    return res


async def _client_main(
    address: str,
    count: int,
    first_id: int,
    start_at: float,
    ramp_s: float,
    duration_s: float,
    budget_ms: int,
    token: str | None,
) -> list[dict]:
    import grpc

    from moshi_grpc.v1 import gateway_pb2, gateway_pb2_grpc

    chunks = [_pcm(i) for i in range(16)]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    # A few channels (HTTP/2 connections) per client process, like several app servers.
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, min(8, count // 25)))]
    stubs = [gateway_pb2_grpc.GatewayStub(ch) for ch in channels]

    async def one(k: int) -> SessionResult:
        # Ramp: sessions start evenly over ramp_s; all of them end at the same time.
        my_start = start_at + ramp_s * k / max(1, count)
        await asyncio.sleep(max(0.0, my_start - time.time()))
        hold = duration_s + (start_at + ramp_s - time.time())
        return await _session(
            stubs[k % len(stubs)], gateway_pb2, first_id + k, hold, budget_ms, metadata, chunks
        )

    try:
        results = await asyncio.gather(*(one(k) for k in range(count)))
    finally:
        for ch in channels:
            await ch.close()
    return [asdict(r) for r in results]


def _client_process(args: tuple, out: mp.Queue) -> None:
    import resource

    try:
        results = asyncio.run(_client_main(*args))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out.put({"results": results, "cpu_s": usage.ru_utime + usage.ru_stime})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put({"error": f"{type(exc).__name__}: {exc}"})


# ----------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [
            sys.executable,
            "-m",
            "moshi_grpc.cli",
            "--log-level",
            "WARNING",
            name,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--metrics-port",
            "-1",
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_serving(self, timeout: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            with grpc.insecure_channel(self.address) as ch:
                try:
                    r = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not serving after {timeout}s")

    def rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def cpu_s(self) -> float:
        """User + system CPU seconds the process used so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def start_stack(phase: str, slots: int, log_dir: Path) -> list[Server]:
    if phase == "echo":
        model = ["--model", "echo"]
        codec_model, lm_model = model, model
    else:  # the small random preset: tiny Mimi + small LM
        codec_model = ["--model", "real", "--mimi-config", "tiny"]
        lm_model = ["--model", "real", "--lm-config", "small"]
    common = ["--max-sessions", str(slots), "--idle-timeout-s", "60"]
    codec = Server("codec", [*codec_model, *common], log_dir)
    lm = Server("lm", [*lm_model, *common], log_dir)
    servers = [codec, lm]
    try:
        codec.wait_serving(180)
        lm.wait_serving(180)
        gateway = Server(
            "gateway",
            ["--codec-addr", codec.address, "--lm-addr", lm.address, "--idle-timeout-s", "60"],
            log_dir,
        )
        servers.append(gateway)
        gateway.wait_serving(60)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


# ----------------------------------------------------------------------------- one phase


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
    return values[k]


def run_phase(
    name: str,
    *,
    sessions: int,
    ramp_s: float,
    duration_s: float,
    budget_ms: int,
    client_procs: int,
    gateway: str | None,
    token: str | None,
    log_dir: Path,
) -> dict:
    print(f"\n== {name}: {sessions} sessions, ramp {ramp_s:.0f}s, hold {duration_s:.0f}s")
    servers: list[Server] = []
    if gateway is None:
        t = time.monotonic()
        servers = start_stack(name, sessions + 2, log_dir)
        gateway = servers[-1].address
        print(f"   stack up in {time.monotonic() - t:.1f}s (gateway {gateway})")
    load_start = round(os.getloadavg()[0], 2)
    procs = max(1, min(client_procs, sessions))
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    start_at = time.time() + 2.0 + 0.5 * procs  # room for the client processes to import
    workers = []
    per = [sessions // procs + (1 if i < sessions % procs else 0) for i in range(procs)]
    first = 0
    for i in range(procs):
        args = (gateway, per[i], first, start_at, ramp_s, duration_s, budget_ms, token)
        first += per[i]
        p = ctx.Process(target=_client_process, args=(args, out), daemon=True)
        p.start()
        workers.append(p)
    # RSS samples: baseline at the end of the ramp, then every few seconds.
    rss: dict[str, list[float]] = {s.name: [] for s in servers}
    cpu0 = {s.name: s.cpu_s() for s in servers}
    t_cpu0 = time.monotonic()
    end_of_ramp = start_at + ramp_s + FRAME_S * 10
    end_at = start_at + ramp_s + duration_s
    sample_every = max(1.0, min(10.0, duration_s / 20))
    next_sample = end_of_ramp
    collected: list = []
    deadline = end_at + 180
    while len(collected) < procs and time.time() < deadline:
        if servers and time.time() >= next_sample and time.time() <= end_at + 1:
            for s in servers:
                rss[s.name].append(s.rss_mib())
            next_sample += sample_every
        with contextlib.suppress(Exception):
            collected.append(out.get(timeout=0.5))
    for p in workers:
        p.join(10)
        if p.is_alive():
            p.kill()
    wall = max(1e-6, time.monotonic() - t_cpu0)
    cpu_cores = {s.name: round((s.cpu_s() - cpu0[s.name]) / wall, 2) for s in servers}
    crashed = [s.name for s in servers if not s.alive()]
    for s in servers:
        s.stop()

    results: list[dict] = []
    errors: list[str] = []
    client_cpu_s = 0.0
    for item in collected:
        if "error" in item:
            errors.append(item["error"])
        else:
            results.extend(item["results"])
            client_cpu_s += item["cpu_s"]
    cpu_cores["clients"] = round(client_cpu_s / wall, 2)
    if len(collected) < procs:
        errors.append(f"{procs - len(collected)} client process(es) did not report (hang?)")
    res = [SessionResult(**r) for r in results]
    admitted = [r for r in res if r.admitted]
    refused = [r for r in res if not r.admitted]
    failed = [r for r in admitted if r.code != "OK"]
    ok_sessions = [r for r in admitted if r.code == "OK"]
    lat = [x for r in admitted for x in r.latencies_ms]
    # Frame accounting over the sessions that ended OK (a failed session's tail has no
    # output by definition; its frames are reported separately).
    late = sum(r.summary.get("frames_late", 0) for r in ok_sessions)
    dropped = sum(r.summary.get("frames_dropped", 0) for r in ok_sessions)
    silence = sum(r.silence for r in ok_sessions)
    sent = sum(r.frames_sent for r in ok_sessions)
    out_frames = sum(r.audio_out for r in ok_sessions)
    unaccounted = sum(r.unaccounted for r in ok_sessions)
    no_summary = [r for r in ok_sessions if r.summary_missing]
    refusal_codes: dict[str, int] = {}
    for r in refused + failed:
        refusal_codes[r.code] = refusal_codes.get(r.code, 0) + 1
    growth = {k: (v[-1] - v[0]) if len(v) >= 2 else 0.0 for k, v in rss.items()}
    report = {
        "phase": name,
        "sessions_requested": sessions,
        "sessions_held": len(admitted),
        "sessions_ok": len(admitted) - len(failed),
        "refused": len(refused),
        "failed_after_admission": len(failed),
        "status_counts": refusal_codes,
        "frames_sent": sent,
        "frames_out": out_frames,
        "frames_late": late,
        "frames_dropped": dropped,
        "frames_silence_other": silence - late - dropped,
        "frames_unaccounted": unaccounted,
        "summaries_missing": len(no_summary),
        # Late/dropped of sessions without a summary are unknown: their silence is "other".
        "silence_in_sessions_without_summary": sum(r.silence for r in no_summary),
        "failed_sessions_frames_sent": sum(r.frames_sent for r in failed),
        "failed_sessions_frames_out": sum(r.audio_out for r in failed),
        "latency_ms": {
            "p50": round(_pct(lat, 50), 1),
            "p95": round(_pct(lat, 95), 1),
            "p99": round(_pct(lat, 99), 1),
            "max": round(max(lat), 1) if lat else 0.0,
            "mean": round(statistics.fmean(lat), 1) if lat else 0.0,
        },
        "rss_mib_start": {k: round(v[0], 1) for k, v in rss.items() if v},
        "rss_mib_end": {k: round(v[-1], 1) for k, v in rss.items() if v},
        "rss_growth_mib": {k: round(v, 1) for k, v in growth.items()},
        "rss_samples": {k: len(v) for k, v in rss.items()},
        "cpu_cores_used": cpu_cores,
        "rss_mib_series": {k: [round(x, 1) for x in v] for k, v in rss.items()},
        "crashed": crashed,
        "errors": errors + sorted({f.details for f in failed if f.details})[:5],
        "unaccounted_sessions": [
            {
                "frames_sent": r.frames_sent,
                "audio_out": r.audio_out,
                "out_of_order": r.out_of_order,
                "summary": r.summary,
            }
            for r in admitted
            if r.unaccounted or r.summary_missing
        ][:10],
        "duration_s": duration_s,
        "ramp_s": ramp_s,
        "load_avg_start": load_start,
        "load_avg_end": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    _print_phase(report)
    return report


def _print_phase(r: dict) -> None:
    lat = r["latency_ms"]
    print(f"   machine load average (1 min) {r['load_avg_start']} -> {r['load_avg_end']}")
    print(
        f"   sessions held {r['sessions_held']}/{r['sessions_requested']} "
        f"(ok {r['sessions_ok']}, refused {r['refused']}, failed {r['failed_after_admission']}) "
        f"statuses {r['status_counts'] or '{}'}"
    )
    print(
        f"   frames sent {r['frames_sent']} out {r['frames_out']} | silence: late "
        f"{r['frames_late']} dropped {r['frames_dropped']} initial-delay/other "
        f"{r['frames_silence_other']} | UNACCOUNTED {r['frames_unaccounted']} "
        f"(sessions that ended OK)"
    )
    if r["summaries_missing"]:
        print(
            f"   SessionEnded summary MISSING in {r['summaries_missing']} session(s) that ended "
            f"OK ({r['silence_in_sessions_without_summary']} of the silent frames are theirs)"
        )
    if r["failed_after_admission"]:
        print(
            f"   failed sessions: frames sent {r['failed_sessions_frames_sent']} "
            f"out {r['failed_sessions_frames_out']} before their error status"
        )
    print(
        f"   latency ms p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']} "
        f"(client: chunk sent -> its output frame received)"
    )
    for name in r["rss_growth_mib"]:
        print(
            f"   {name:8s} RSS {r['rss_mib_start'].get(name, 0):7.1f} -> "
            f"{r['rss_mib_end'].get(name, 0):7.1f} MiB (growth {r['rss_growth_mib'][name]:+.1f}, "
            f"{r['rss_samples'][name]} samples), CPU {r['cpu_cores_used'].get(name, 0):.2f} cores"
        )
    print(f"   load-test clients CPU {r['cpu_cores_used'].get('clients', 0):.2f} cores")
    if r["crashed"]:
        print(f"   CRASHED: {r['crashed']}")
    for e in r["errors"]:
        print(f"   error: {e}")


def phase_ok(r: dict) -> bool:
    return (
        r["sessions_held"] > 0
        and r["failed_after_admission"] == 0
        and r["frames_unaccounted"] == 0
        and r["summaries_missing"] == 0
        and not r["crashed"]
        and not r["errors"]
    )


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=200, help="echo phase: concurrent sessions")
    p.add_argument(
        "--small-sessions", type=int, default=8, help="small-preset phase sessions (0 = skip)"
    )
    p.add_argument("--duration", type=float, default=60.0, help="hold (soak) seconds per phase")
    p.add_argument(
        "--small-duration",
        type=float,
        default=None,
        help="small phase hold (default: min(duration, 30))",
    )
    p.add_argument(
        "--ramp-s", type=float, default=None, help="ramp-up seconds (default ~sessions/20)"
    )
    p.add_argument("--budget-ms", type=int, default=1000, help="per-frame budget of each session")
    p.add_argument("--client-procs", type=int, default=None, help="client processes (default 1-2)")
    p.add_argument("--gateway", default=None, help="target a running gateway (loopback only)")
    p.add_argument("--token", default=os.environ.get("MOSHI_GRPC_AUTH_TOKEN"), help="bearer token")
    p.add_argument("--short", action="store_true", help="CI mode: echo only, 50 sessions, ~15 s")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.short:
        args.sessions, args.small_sessions = min(args.sessions, 50), 0
        args.duration = min(args.duration, 6.0)
    if not 1 <= args.sessions <= MAX_SESSIONS:
        raise SystemExit(f"--sessions must be in 1..{MAX_SESSIONS}")
    if not 0 < args.duration <= MAX_DURATION_S:
        raise SystemExit(f"--duration must be in (0, {MAX_DURATION_S}]")
    if args.gateway and not args.gateway.startswith((f"{LOOPBACK}:", "localhost:")):
        raise SystemExit("--gateway must be a loopback address (127.0.0.1:PORT)")
    with tempfile.TemporaryDirectory(prefix="moshi-loadtest-") as tmp:
        reports = []
        ramp = args.ramp_s if args.ramp_s is not None else max(2.0, args.sessions / 25)
        reports.append(
            run_phase(
                "echo",
                sessions=args.sessions,
                ramp_s=ramp,
                duration_s=args.duration,
                budget_ms=args.budget_ms,
                client_procs=args.client_procs or (2 if args.sessions > 100 else 1),
                gateway=args.gateway,
                token=args.token,
                log_dir=Path(tmp),
            )
        )
        if args.small_sessions > 0 and args.gateway is None:
            small_dir = Path(tmp) / "small"
            small_dir.mkdir()
            reports.append(
                run_phase(
                    "small",
                    sessions=args.small_sessions,
                    ramp_s=2.0,
                    duration_s=args.small_duration or min(args.duration, 30.0),
                    budget_ms=args.budget_ms,
                    client_procs=1,
                    gateway=None,
                    token=args.token,
                    log_dir=small_dir,
                )
            )
    ok = all(phase_ok(r) for r in reports)
    print(f"\nRESULT: {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ok": ok, "phases": reports}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
