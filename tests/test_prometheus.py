"""The operator story against a real Prometheus (Debian's `prometheus`, as CI installs it).

Prometheus runs with the shipped `deploy/prometheus/prometheus.yml`, whose jobs, labels and
rule file are kept and whose targets are moved to the services' loopback metrics ports, and
with `deploy/prometheus/alerts.yml` generated into a variant whose `for:` durations are 1 s
(every expression, label and annotation as shipped). What is read back goes through
Prometheus's HTTP API, as a dashboard or an alert manager would:

- under `moshi-grpc up`: the gateway's frame rate and the backends' slots in use while a
  conversation runs (and free again after it), then the replica-down alert once a backend
  is killed;
- codec, LM and gateway as their own processes (what `up` starts), the LM with an injected
  delay (`--inject-delay-ms`, which `up` does not pass on): the budget-miss alerts.

Every wait is for an explicit state (a target up, a series with a value, an alert firing),
bounded only as a hang guard. Skipped, with the reason, where `prometheus` is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT
from svc_harness import SERVING, ServiceProcess, health_status_sync

from moshi_grpc.clients import ConverseClient, SessionEnded

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.prometheus,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus not installed (Debian package `prometheus`; the README's test "
        "set-up installs it: `apt-get install -y prometheus`, as root)",
    ),
]

SHIPPED = REPO_ROOT / "deploy" / "prometheus"
JOBS = {"moshi-gateway": "gateway", "moshi-codec": "codec", "moshi-lm": "lm"}
HANG_S = 90.0  # a hang guard, never a timing assertion
FRAME = 1920  # 80 ms at 24 kHz


def wait_for(predicate: Callable[[], object], what: str, timeout: float = HANG_S) -> object:
    """Poll until `predicate()` is truthy and return it; AssertionError on a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            value = predicate()
            if value:
                return value
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s (hang?)")


def loopback_config(metrics_ports: dict[str, int], rules: Path, self_port: int) -> dict:
    """The shipped prometheus.yml with its targets on loopback, a 1 s scrape and evaluation
    interval and the generated rule file; every job of the shipped file must be mapped."""
    cfg = yaml.safe_load((SHIPPED / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    assert cfg["rule_files"] == ["/etc/prometheus/alerts.yml"]
    cfg["rule_files"] = [str(rules)]
    for job in cfg["scrape_configs"]:
        (static,) = job["static_configs"]
        if job["job_name"] == "prometheus":
            static["targets"] = [f"127.0.0.1:{self_port}"]
            continue
        service = JOBS[job["job_name"]]  # a new job in the shipped file needs a port here
        assert static["labels"]["service"] == service
        static["targets"] = [f"127.0.0.1:{metrics_ports[service]}"]
    return cfg


def fast_alert_rules() -> dict:
    """alerts.yml with every `for:` at 1 s, nothing else changed."""
    rules = yaml.safe_load((SHIPPED / "alerts.yml").read_text())
    shortened = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
                shortened += 1
    assert shortened, "no `for:` in the shipped rules?"
    return rules


class Prometheus:
    """A `prometheus` process on loopback with a generated config; its HTTP API."""

    def __init__(self, tmp: Path, port: int, metrics_ports: dict[str, int]) -> None:
        rules = tmp / "alerts.yml"
        rules.write_text(yaml.safe_dump(fast_alert_rules()))
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(loopback_config(metrics_ports, rules, port)))
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, "Prometheus ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.logs()
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:  # noqa: S310
            return r.status == 200

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> object:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as r:  # noqa: S310
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict, float]]:
        """An instant query: [(labels, value)]."""
        data = self.api("query", query=expr)
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def value(self, expr: str) -> float | None:
        """The value of a query that gives one series (None while it gives none)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return result[0][1] if result else None

    def alerts(self, name: str, state: str | None = None) -> list[dict]:
        """Active alerts called `name` (pending or firing; only `state` when given)."""
        return [
            a
            for a in self.api("alerts")["alerts"]
            if a["labels"]["alertname"] == name and state in (None, a["state"])
        ]

    def targets_up(self, jobs: set[str]) -> bool:
        active = self.api("targets")["activeTargets"]
        up = {t["labels"]["job"] for t in active if t["health"] == "up"}
        return jobs <= up

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def prometheus(tmp: Path, port: int, metrics_ports: dict[str, int]) -> Iterator[Prometheus]:
    prom = Prometheus(tmp, port, metrics_ports)
    try:
        yield prom
    except BaseException:
        print(prom.logs()[-4000:])
        raise
    finally:
        prom.stop()


class Conversation:
    """One session through the SDK, fed one 80 ms frame per 80 ms (live audio) by a thread
    until `stop()`; its events are kept."""

    def __init__(self, address: str, **options) -> None:
        self._stop = threading.Event()
        self.events: list = []
        self.error: BaseException | None = None
        self._client = ConverseClient(address, timeout=HANG_S * 3)
        self._conversation = self._client.converse(self._chunks(), sample_rate=24000, **options)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _chunks(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(0)
        while not self._stop.is_set():
            yield rng.uniform(-0.3, 0.3, FRAME).astype(np.float32)
            self._stop.wait(0.08)

    def _run(self) -> None:
        try:
            for event in self._conversation:
                self.events.append(event)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(HANG_S)
        self._client.close()
        assert not self._thread.is_alive(), "the conversation did not end (hang?)"


def _child_pid(parent: int, port: int) -> int:
    """The pid of `parent`'s child process serving gRPC on `port` (from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone, or no --port
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if ppid == parent and args[args.index(b"--port") + 1] == str(port).encode():
                return int(proc.name)
    raise AssertionError(f"no child of {parent} serves port {port}")


def test_prometheus_sees_a_conversation_under_up_and_a_replica_down(
    tmp_path, free_port_factory
) -> None:
    ports = {name: free_port_factory() for name in JOBS.values()}
    metrics = {name: free_port_factory() for name in JOBS.values()}
    args = [sys.executable, "-m", "moshi_grpc.cli", "up", "--model", "echo"]
    for name in JOBS.values():
        args += [f"--{name}-port", str(ports[name]), f"--{name}-metrics-port", str(metrics[name])]
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - closed below
    up = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gateway = f"127.0.0.1:{ports['gateway']}"
    try:

        def serving() -> bool:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            with contextlib.suppress(Exception):
                return health_status_sync(gateway, timeout=1.0) == SERVING
            return False

        wait_for(serving, "`moshi-grpc up` SERVING")
        (tmp_path / "prom").mkdir()
        with prometheus(tmp_path / "prom", free_port_factory(), metrics) as prom:
            wait_for(lambda: prom.targets_up(set(JOBS)), "every target scraped up")
            assert prom.value('sum(moshi_lm_slots_in_use{job="moshi-lm"})') == 0
            assert not prom.alerts("MoshiReplicaDown")

            talk = Conversation(gateway, budget_ms=5000, max_consecutive_misses=0)
            try:
                rate = 'rate(moshi_gateway_frames_total{job="moshi-gateway"}[5s])'
                assert wait_for(lambda: prom.value(rate), "a gateway frame rate") > 0
                held = {
                    'moshi_lm_slots_in_use{job="moshi-lm",service="lm"}': 1,
                    'moshi_codec_slots_in_use{job="moshi-codec",stage="encode"}': 1,
                    'moshi_codec_slots_in_use{job="moshi-codec",stage="decode"}': 1,
                }
                for expr, slots in held.items():
                    wait_for(lambda e=expr, n=slots: prom.value(e) == n, f"{expr} == {slots}")
            finally:
                talk.stop()
            assert talk.error is None, talk.error
            assert isinstance(talk.events[-1], SessionEnded)
            for expr in held:
                wait_for(lambda e=expr: prom.value(e) == 0, f"{expr} back to 0")
            out = 'moshi_gateway_frames_total{job="moshi-gateway"}'
            frames = talk.events[-1].summary.frames_out
            assert wait_for(lambda: prom.value(out) == frames, "every frame scraped")

            # A backend killed: Prometheus cannot scrape it, and the alert fires for it.
            lm_pid = _child_pid(up.pid, ports["lm"])
            os.kill(lm_pid, signal.SIGKILL)
            firing = wait_for(
                lambda: [
                    a
                    for a in prom.alerts("MoshiReplicaDown", "firing")
                    if a["labels"]["job"] == "moshi-lm"
                ],
                "MoshiReplicaDown firing for the LM",
            )
            (alert,) = firing
            assert alert["labels"]["instance"] == f"127.0.0.1:{metrics['lm']}"
            assert alert["labels"]["severity"] == "critical"
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
        log.close()


def test_budget_miss_alerts_fire_under_an_injected_delay(tmp_path, free_port_factory) -> None:
    """An LM that sleeps 150 ms in every step, at the default budget (200 ms) with live
    audio (a frame per 80 ms): the backlog grows, frames miss, and both budget-miss alerts
    fire (the shipped rules: over 2 % and over 10 % of frames)."""
    metrics = {name: free_port_factory() for name in JOBS.values()}
    backend = ["--model", "echo", "--max-sessions", "4"]
    extra = {"codec": backend, "lm": [*backend, "--inject-delay-ms", "150"]}
    procs: dict[str, ServiceProcess] = {}
    try:
        for name in ("codec", "lm"):
            procs[name] = ServiceProcess(
                name, free_port_factory(), metrics[name], extra[name], tmp_path / f"{name}.log"
            )
        for name in ("codec", "lm"):
            procs[name].wait_serving()
        addrs = ["--codec-addr", procs["codec"].address, "--lm-addr", procs["lm"].address]
        procs["gateway"] = ServiceProcess(
            "gateway", free_port_factory(), metrics["gateway"], addrs, tmp_path / "gateway.log"
        )
        procs["gateway"].wait_serving()
        (tmp_path / "prom").mkdir()
        with prometheus(tmp_path / "prom", free_port_factory(), metrics) as prom:
            wait_for(lambda: prom.targets_up(set(JOBS)), "every target scraped up")
            for name in ("MoshiBudgetMissRateHigh", "MoshiBudgetMissRateCritical"):
                assert not prom.alerts(name), name
            talk = Conversation(procs["gateway"].address, max_consecutive_misses=0)
            try:
                for name, severity in (
                    ("MoshiBudgetMissRateCritical", "critical"),
                    ("MoshiBudgetMissRateHigh", "warning"),
                ):
                    (alert,) = wait_for(lambda n=name: prom.alerts(n, "firing"), f"{name} firing")
                    assert alert["labels"]["severity"] == severity
                    assert float(alert["value"]) > 0.10
            finally:
                talk.stop()
            assert talk.error is None, talk.error
            summary = talk.events[-1].summary
            assert summary.frames_late + summary.frames_dropped > 0
            assert prom.value("sum(moshi_gateway_budget_misses_total)") >= 1
    finally:
        for proc in procs.values():
            proc.stop()
