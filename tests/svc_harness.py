"""Test harness for the reliability/security suites: real servers, real transport.

Two ways to run the services, both on loopback only:

- `LoopThread`: a background asyncio loop in this process, so synchronous test bodies
  (hypothesis `@given` examples) can start in-process grpc.aio servers and drive grpc.aio
  clients on that loop with `loop.run(coro)`.
- `ServiceProcess`: a `moshi-grpc <service> ...` subprocess (for kill -9, SIGSTOP, log
  capture), whose readiness is the grpc.health.v1 status SERVING.

Plus small helpers: health checks, Info, Prometheus scraping (parsed with
prometheus_client.parser), /proc RSS, a FLOAT32 conversation's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from moshi_grpc.v1 import gateway_pb2

T = TypeVar("T")

SERVING = health_pb2.HealthCheckResponse.SERVING


class LoopThread:
    """An asyncio event loop running in a daemon thread; `run()` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run `coro` on the loop and wait for its result (a hang fails after `timeout`)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        async def _drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(_drain(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def health_status(address: str, service: str = "", *, timeout: float = 3.0, **kw) -> int:
    """grpc.health.v1 Check over a fresh insecure (or `credentials=`) channel."""
    creds = kw.get("credentials")
    channel = (
        grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return reply.status


def health_status_sync(address: str, service: str = "", timeout: float = 3.0) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return reply.status


def scrape(url: str, timeout: float = 5.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET /metrics and parse it: sample name -> [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def metric_value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            total += value
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of a process from /proc (Linux), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ServiceProcess:
    """One `moshi-grpc <service>` subprocess on loopback; logs go to `log_path`."""

    def __init__(
        self,
        service: str,
        port: int,
        metrics_port: int,
        extra_args: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.service = service
        self.port = port
        self.metrics_port = metrics_port
        self.address = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "moshi_grpc.cli",
            "--log-level",
            log_level,
            service,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            *extra_args,
        ]
        full_env = dict(os.environ)
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env.update(env or {})
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Block until health says SERVING; RuntimeError (with the log) if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.service} exited with {self.proc.returncode}:\n{self.logs()}"
                )
            with contextlib.suppress(grpc.RpcError):
                if health_status_sync(self.address, timeout=1.0) == SERVING:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.service} not SERVING after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (drain), then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def float32_session(pcm: np.ndarray, **config: Any) -> list[Any]:
    """A whole Converse request stream: the config (24 kHz FLOAT32, plus `config`'s fields)
    then `pcm` in one chunk; the gateway cuts it into 80 ms frames."""
    session = gateway_pb2.SessionConfig(
        sample_rate=24000, encoding=gateway_pb2.AUDIO_ENCODING_FLOAT32, **config
    )
    audio = gateway_pb2.AudioChunk(data=np.asarray(pcm, "<f4").tobytes())
    return [gateway_pb2.ConverseRequest(config=session), gateway_pb2.ConverseRequest(audio=audio)]


def run_stream(
    method: Any,
    messages: Sequence[Any],
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 10.0,
) -> tuple[grpc.StatusCode, str, list[Any]]:
    """Drive one bidi stream with the *sync* client: send `messages`, half-close, read every
    reply. Returns (status code, details, replies).

    Sync on purpose: when a server ends a stream while the client is still writing, the
    grpc.aio client marks the call INTERNAL "Internal error from Core" (its failed write
    overwrites the server's status), in ~40% of runs here; the sync client always reports
    the server's status. Call it from async tests with `asyncio.to_thread`.
    """
    replies: list[Any] = []
    try:
        for reply in method(iter(list(messages)), metadata=tuple(metadata), timeout=timeout):
            replies.append(reply)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", replies
    return grpc.StatusCode.OK, "", replies


def channel(address: str, credentials: grpc.ChannelCredentials | None = None, **kw) -> grpc.Channel:
    """A sync channel to a loopback server (TLS when `credentials` is given)."""
    options = kw.get("options", ())
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


class StreamDriver:
    """A bidi stream driven from a test thread with the sync client: `send()` queues
    requests, a reader thread collects replies and the final status (`wait()`).

    With `read=False` nobody reads the replies (a slow client): gRPC flow control then
    pushes back on the server, which is what the slow-client tests look at."""

    def __init__(
        self,
        method: Any,
        first: Any,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float = 60.0,
        read: bool = True,
    ) -> None:
        import queue

        self._queue: queue.Queue[Any] = queue.Queue()
        self._queue.put(first)
        self.call = method(iter(self._queue.get, None), metadata=tuple(metadata), timeout=timeout)
        self.replies: list[Any] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._done = threading.Event()
        self._first_reply = threading.Event()
        self._reader: threading.Thread | None = None
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.replies.append(reply)
                self._first_reply.set()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            self.code = err.code()
            self.details = err.details() or ""
        finally:
            self._done.set()

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        """Half-close: no more requests."""
        self._queue.put(None)

    def cancel(self) -> None:
        self.call.cancel()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = 30.0) -> grpc.StatusCode:
        """Final status; AssertionError if the stream did not end in time (a hang)."""
        if not self._done.wait(timeout):
            raise AssertionError(f"stream did not end within {timeout}s (hang?)")
        assert self.code is not None
        return self.code

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(r) for r in list(self.replies)):
                return True
            if self._done.is_set():
                return any(predicate(r) for r in list(self.replies))
            time.sleep(0.01)
        return False


async def until_queued(scheduler: Any, n: int, timeout_s: float = 30.0) -> None:
    """Wait until `n` frames are queued on a held `BatchScheduler` (see its `hold()`): the
    test then knows which frames the next tick takes, whatever their arrival times."""
    async with asyncio.timeout(timeout_s):
        # (polled: frames are queued under the scheduler's lock, which offers no event)
        while scheduler.frames_queued < n:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
