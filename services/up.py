"""`moshi-grpc up`: codec, LM and gateway on loopback, one command (the main job on one box).

Each service runs as its own process (`moshi-grpc codec|lm|gateway`), exactly as it would in
a cluster; `up` starts the backends, waits until grpc.health.v1 says SERVING, starts the
gateway pointed at them, waits again, and prints the addresses. Then either it serves until
Ctrl-C / SIGTERM (children are drained in order: gateway first, then the backends), or, with
`--demo OUT_DIR`, it runs one conversation from a generated speech-like wav through the
gateway, writes OUT_DIR/input.wav, OUT_DIR/reply.wav and OUT_DIR/transcript.txt, prints a
summary and shuts everything down.

Without weights the backends run the small random presets (tiny Mimi, small LM): the whole
pipeline works on any laptop, and we say so loudly because the replies are noise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from moshi_grpc.services.common import flags
from moshi_grpc.services.common.flags import DEFAULT_PORTS

log = logging.getLogger(__name__)

DEMO_SECONDS = 4.0
DEMO_RATE = 16000
# The demo is a demonstration, not a latency test: its session asks for a generous per-frame
# budget so that admission control never refuses it on a slow or busy machine (the small
# random presets on a laptop CPU can take a few hundred ms per step); late frames are still
# counted and reported.
DEMO_BUDGET_MS = 3000

BANNER = """
############################################################################
#  NO WEIGHTS GIVEN: running the SMALL RANDOM PRESET (tiny Mimi, small LM). #
#  The whole pipeline runs, but the replies are NOISE and the text random. #
#  For the real model pass --mimi-weights/--moshi-weights/--tokenizer, or   #
#  --hf-repo kyutai/moshiko-pytorch-bf16 where the network allows.          #
############################################################################
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--demo",
        metavar="OUT_DIR",
        default=None,
        help="run one demo conversation, write input.wav, reply.wav, transcript.txt to OUT_DIR, "
        "then shut down (exit 0 on success)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address every service binds")
    for name in ("gateway", "codec", "lm"):
        parser.add_argument(
            f"--{name}-port",
            type=int,
            default=None,
            help=f"gRPC port of the {name} (default {DEFAULT_PORTS[name][0]}; 0 or --demo: a "
            "free port)",
        )
        parser.add_argument(
            f"--{name}-metrics-port",
            type=int,
            default=None,
            help=f"Prometheus /metrics port of the {name} (default {DEFAULT_PORTS[name][1]}; "
            f"0, --demo or --{name}-port 0: a free port)",
        )
    parser.add_argument(
        "--model",
        choices=["real", "echo"],
        default="real",
        help="backends: real models (random presets without weights) or zero-cost echo",
    )
    parser.add_argument("--mimi-weights", default=None, help="Mimi safetensors")
    parser.add_argument("--moshi-weights", default=None, help="Moshi LM safetensors")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece text tokenizer (.model)")
    parser.add_argument("--lm-config", default=None, help="LM preset or kyutai config.json")
    parser.add_argument("--hf-repo", default=None, help="download weights from this HF repo")
    parser.add_argument("--device", default="cpu", help="torch device of both backends")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    flags.add_max_sessions_flag(parser)  # passed on to the codec and the LM
    flags.add_cuda_graphs_flag(parser)  # both passed on to the codec and the LM
    flags.add_cpu_forms_flag(parser)
    parser.add_argument("--budget-ms", type=int, default=200, help="default per-frame budget")
    parser.add_argument(
        "--voice-dir",
        default=None,
        help="the gateway's named voices for persona sessions (WAV files, named by their "
        "stems); a persona needs a persona LM, e.g. --lm-config personaplex-small",
    )
    parser.add_argument(
        "--start-timeout-s",
        type=float,
        default=600.0,
        help="how long to wait for each service to report SERVING (model loading)",
    )
    parser.add_argument(
        "--demo-seconds", type=float, default=DEMO_SECONDS, help="length of the demo input"
    )
    flags.add_otel_flag(parser)  # passed on to all three services


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _choose_ports(args: argparse.Namespace, name: str, demo: bool) -> tuple[int, int]:
    """(gRPC port, metrics port) of one service: the flag's value, a free port for 0 (or
    for an unset flag with --demo or with the service's gRPC port 0), else the default."""
    grpc_default, metrics_default = DEFAULT_PORTS[name]
    grpc_port = getattr(args, f"{name}_port")
    metrics_port = getattr(args, f"{name}_metrics_port", None)
    for flag, value in ((f"--{name}-port", grpc_port), (f"--{name}-metrics-port", metrics_port)):
        if value is not None and not 0 <= value <= 65535:
            raise ValueError(f"{flag} must be between 0 and 65535, got {value}")
    ephemeral = demo or grpc_port == 0
    if grpc_port is None:
        grpc_port = 0 if demo else grpc_default
    if metrics_port is None:
        metrics_port = 0 if ephemeral else metrics_default
    return (
        grpc_port or _free_port(args.host),
        metrics_port or _free_port(args.host),
    )


@dataclass
class Child:
    """One service subprocess."""

    name: str
    address: str
    metrics_url: str
    proc: subprocess.Popen
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _no_weights(args: argparse.Namespace) -> bool:
    return args.model == "real" and not (args.mimi_weights or args.moshi_weights or args.hf_repo)


def _service_args(args: argparse.Namespace, name: str) -> list[str]:
    tracing = ["--otel-endpoint", args.otel_endpoint] if args.otel_endpoint else []
    return _own_args(args, name) + tracing


def _own_args(args: argparse.Namespace, name: str) -> list[str]:
    backend = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    backend += ["--max-sessions", str(args.max_sessions), "--cuda-graphs", args.cuda_graphs]
    backend += ["--cpu-forms", args.cpu_forms]
    if name == "codec":
        out = backend
        if args.mimi_weights:
            out += ["--mimi-weights", args.mimi_weights]
        elif args.hf_repo:
            out += ["--hf-repo", args.hf_repo]
        else:
            out += ["--mimi-config", "tiny"]
        return out
    if name == "lm":
        out = backend
        if args.moshi_weights:
            out += ["--moshi-weights", args.moshi_weights]
            out += ["--lm-config", args.lm_config or "moshiko-7b"]
        elif args.hf_repo:
            out += ["--hf-repo", args.hf_repo]
        else:
            out += ["--lm-config", args.lm_config or "small"]
        if args.tokenizer:
            out += ["--tokenizer", args.tokenizer]
        return out
    out = ["--budget-ms", str(args.budget_ms)]
    if args.voice_dir:
        out += ["--voice-dir", args.voice_dir]
    return out


def _spawn(
    name: str,
    host: str,
    port: int,
    metrics_port: int,
    extra: list[str],
    log_dir: Path | None,
    log_level: str,
) -> Child:
    cmd = [
        sys.executable,
        "-m",
        "moshi_grpc.cli",
        "--log-level",
        log_level,
        name,
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *extra,
    ]
    env = dict(os.environ)
    # Three processes share the machine: keep each backend's torch to a couple of threads.
    env.setdefault("OMP_NUM_THREADS", str(max(1, min(4, (os.cpu_count() or 2) // 2))))
    log_path = None
    stdout = None
    if log_dir is not None:
        log_path = log_dir / f"{name}.log"
        stdout = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its life
    proc = subprocess.Popen(
        cmd, stdout=stdout, stderr=subprocess.STDOUT if stdout else None, env=env
    )
    if stdout is not None:
        stdout.close()  # the child has its own copy of the descriptor
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return Child(name, f"{dial}:{port}", f"http://{dial}:{metrics_port}/metrics", proc, log_path)


def _wait_serving(child: Child, timeout_s: float) -> None:
    """Poll grpc.health.v1 until SERVING; RuntimeError if the child dies or times out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(child.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited with code {child.proc.returncode}\n{child.tail()}"
                )
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"{child.name} not SERVING after {timeout_s:.0f} s\n{child.tail()}")


def _stop(children: list[Child], grace_s: float = 10.0) -> None:
    """SIGTERM in the given order (each drains), SIGKILL what is still alive after grace."""
    for child in children:
        if child.alive():
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killing it", child.name, grace_s)
                child.proc.kill()
                child.proc.wait()


def _demo(gateway: Child, out_dir: Path, seconds: float, budget_ms: int) -> int:
    """One conversation from a generated speech-like wav; writes the reply and transcript."""
    from moshi_grpc import audio
    from moshi_grpc.clients import ConverseClient, ConverseError

    input_path = out_dir / "input.wav"
    audio.write_wav(input_path, audio.speech_like(seconds, DEMO_RATE, seed=1), DEMO_RATE)
    print(f"demo: streaming {input_path} ({seconds:.1f} s at {DEMO_RATE} Hz) in real time")
    with ConverseClient(gateway.address, timeout=seconds + 60.0) as client:
        try:
            result = client.converse_wav(
                input_path,
                realtime=True,
                seed=42,
                budget_ms=budget_ms,
                max_consecutive_misses=0,
                client_id="demo",
            ).collect()
        except ConverseError as exc:
            print(f"demo: the conversation failed: {exc}", file=sys.stderr)
            return 1
    reply_path = out_dir / "reply.wav"
    audio.write_wav(reply_path, result.audio, result.sample_rate)
    transcript_path = out_dir / "transcript.txt"
    transcript_path.write_text(result.transcript + "\n", encoding="utf-8")
    s = result.summary
    started = result.started
    print("demo: done")
    if started is not None:
        print(f"  session       {started.session_id} (model {started.model})")
        print(f"  replicas      codec {started.codec_replica}, lm {started.lm_replica}")
    if s is not None:
        print(
            f"  frames        in {s.frames_in}, out {s.frames_out}, late {s.frames_late}, "
            f"dropped {s.frames_dropped} (reason: {s.reason})"
        )
        print(
            f"  latency       p50 {s.latency_p50_ms:.1f} ms, p95 {s.latency_p95_ms:.1f} ms, "
            f"p99 {s.latency_p99_ms:.1f} ms per frame (input frame complete -> output sent)"
        )
        if s.frames_late or s.frames_dropped:
            print(
                f"  NOTE          {s.frames_late + s.frames_dropped} of {s.frames_out} frames "
                f"were LATE or DROPPED and are silence in the reply (budget {budget_ms} ms per "
                "frame): this machine did not keep up in real time (busy CPU or no GPU)"
            )
    print(
        f"  reply         {reply_path} ({len(result.audio) / result.sample_rate:.2f} s at "
        f"{result.sample_rate} Hz, {result.silence_frames}/{result.frames} frames silence)"
    )
    preview = result.transcript.strip()
    preview = preview if len(preview) <= 120 else preview[:117] + "..."
    print(f"  transcript    {transcript_path}: {preview!r}")
    return 0


def run(args: argparse.Namespace) -> int:
    demo_dir = Path(args.demo) if args.demo else None
    if demo_dir is not None:
        demo_dir.mkdir(parents=True, exist_ok=True)
    if _no_weights(args):
        print(BANNER, file=sys.stderr, flush=True)
        log.warning("no weights given: small random presets (tiny Mimi, small LM), noise output")
    try:
        ports = {name: _choose_ports(args, name, demo_dir is not None) for name in DEFAULT_PORTS}
    except ValueError as exc:
        print(f"moshi-grpc up: {exc}", file=sys.stderr)
        return 2
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    log_dir = demo_dir
    children: list[Child] = []

    def on_signal(signum, _frame) -> None:
        raise KeyboardInterrupt  # unwinds to the `finally` below, which drains the children

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        backends = [
            _spawn(name, args.host, *ports[name], _service_args(args, name), log_dir, level)
            for name in ("codec", "lm")
        ]
        children.extend(backends)
        for child in backends:
            _wait_serving(child, args.start_timeout_s)
        gateway_args = _service_args(args, "gateway")
        gateway_args += ["--codec-addr", backends[0].address, "--lm-addr", backends[1].address]
        gateway = _spawn("gateway", args.host, *ports["gateway"], gateway_args, log_dir, level)
        children.insert(0, gateway)
        _wait_serving(gateway, args.start_timeout_s)
        print("moshi-grpc up: all services SERVING")
        for child in children:
            print(f"  {child.name:8s} grpc {child.address:22s} metrics {child.metrics_url}")
        if log_dir is not None:
            print(f"  logs     {log_dir}/{{gateway,codec,lm}}.log")
        sys.stdout.flush()
        if demo_dir is not None:
            budget = max(args.budget_ms, DEMO_BUDGET_MS)
            return _demo(gateway, demo_dir, args.demo_seconds, budget)
        print("Ctrl-C to stop.", flush=True)
        while True:
            dead = [c for c in children if not c.alive()]
            if dead:
                log.error("%s exited with code %s", dead[0].name, dead[0].proc.returncode)
                return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("moshi-grpc up: stopping", file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"moshi-grpc up: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
