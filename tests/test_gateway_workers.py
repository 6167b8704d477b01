"""`moshi-grpc gateway --workers N`: N gateway processes on one port (SO_REUSEPORT), each
with its own backend channels; metrics per worker (one /metrics port each) add up to what
happened; SIGTERM to the parent drains every worker and exits 0."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time

import grpc
import pytest
from conftest import _free_port
from svc_harness import ServiceProcess, metric_value, scrape
from test_faults import ECHO_ARGS, run_session


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_gateway_workers_share_one_port_and_their_metrics_add_up(tmp_path) -> None:
    codec = ServiceProcess("codec", _free_port(), _free_port(), ECHO_ARGS, tmp_path / "c.log")
    lm = ServiceProcess("lm", _free_port(), _free_port(), ECHO_ARGS, tmp_path / "l.log")
    procs = [codec, lm]
    clean = False
    try:
        codec.wait_serving()
        lm.wait_serving()
        args = ["--codec-addr", codec.address, "--lm-addr", lm.address, "--workers", "2"]
        # --metrics-port 0: every worker serves /metrics on an ephemeral port (logged).
        gw = ServiceProcess("gateway", _free_port(), 0, args, tmp_path / "g.log")
        procs.append(gw)
        gw.wait_serving()

        def urls() -> list[str]:
            return re.findall(r"metrics on (http://\S+/metrics)", gw.logs())

        _wait_for(
            lambda: len(urls()) == 2 and gw.logs().count("gateway worker") >= 2,
            60,
            "both workers serving",
        )
        sessions = 6
        for _ in range(sessions):  # a new connection each: the kernel picks the worker
            assert run_session(gw.address, 3).code == grpc.StatusCode.OK
        scraped = [scrape(u) for u in urls()]
        started = sum(metric_value(m, "moshi_gateway_sessions_started_total") for m in scraped)
        ended = sum(
            metric_value(m, "moshi_gateway_sessions_ended_total", reason="client_closed")
            for m in scraped
        )
        frames = sum(metric_value(m, "moshi_gateway_frames_total") for m in scraped)
        assert started == ended == sessions
        assert frames == sessions * 3
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=30) == 0, gw.logs()
        clean = True
    finally:
        for p in reversed(procs):
            p.stop()
        if len(procs) == 3 and not clean:  # workers a failed parent left: its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(procs[2].pid, signal.SIGKILL)
