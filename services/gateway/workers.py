"""`moshi-grpc gateway --workers N`: N gateway processes sharing one gRPC port.

The kernel spreads new connections over them (SO_REUSEPORT); each has its own backend
channels and mux streams. The workers are fresh processes (no fork after gRPC started:
there is none in the supervisor).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) `host:port` with SO_REUSEPORT, as gRPC's multiprocessing example
    does: the port is held for the workers (port 0: a free one is picked) and this socket
    takes no connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(args: argparse.Namespace) -> int:
    """`--workers N`: start N gateway processes on one port, forward SIGTERM/SIGINT to them
    (each drains), and exit when they have; a worker that dies stops the others (the
    orchestrator restarts the pod). The workers are fresh processes (no fork after gRPC
    started: there is none in this one)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers needs SO_REUSEPORT (Linux, macOS)")
    argv = sys.argv[1:]
    if "gateway" not in argv:
        raise ValueError("--workers: run as `moshi-grpc gateway ...`")
    reserved = reserve_port(args.host, args.port)
    port = reserved.getsockname()[1]
    procs: list[subprocess.Popen] = []
    for i in range(args.workers):
        extra = ["--port", str(port), "--workers", str(args.workers), "--worker-index", str(i)]
        if args.metrics_port > 0:
            extra += ["--metrics-port", str(args.metrics_port + i)]
        cmd = [sys.executable, "-m", "moshi_grpc.cli", *argv, *extra]
        procs.append(subprocess.Popen(cmd))
    log.info("gateway: %d workers on %s:%d", args.workers, args.host, port)
    stopping = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            for p in procs:
                code = p.poll()
                if code is not None and code != 0 and not stopping:
                    log.error("gateway worker exited with %d; stopping the others", code)
                    rc = code
                    forward(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        reserved.close()
    codes = [p.returncode for p in procs]
    return rc or max((c for c in codes if c is not None), default=0)
