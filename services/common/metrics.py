"""Every Prometheus metric of moshi-grpc, defined in one place.

Each server builds its metrics on its own `CollectorRegistry` (never the process-global
default), so several servers in one process (tests, `moshi-grpc up`) do not collide, and
serves that registry on `/metrics` over HTTP (`serve_metrics`). Naming follows
prometheus.io: `moshi_` prefix, base units (`_seconds`), `_total` on counters, histograms
(aggregatable across replicas) whose latency buckets include the per-frame budget values
0.08 / 0.1 / 0.2 s, and no per-session labels (cardinality stays bounded).

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| `grpc_server_started_total` | counter | grpc_service, grpc_method, grpc_type | RPCs started on the server |
| `grpc_server_handled_total` | counter | grpc_service, grpc_method, grpc_type, grpc_code | RPCs completed, by status code |
| `grpc_server_handling_seconds` | histogram | grpc_service, grpc_method, grpc_type | RPC duration (whole stream for streaming RPCs) |
| `moshi_build_info` | gauge | service, version, model, config, device, dtype | always 1; what this replica runs |
| `moshi_server_ready` | gauge | service | 1 once the model is loaded and the server admits streams |
| `moshi_server_draining` | gauge | service | 1 while draining (refusing new streams) |
| `moshi_model_load_seconds` | gauge | service | time it took to load the model at start-up |
| `moshi_codec_streams_active` | gauge | stage | open Encode/Decode streams (stage = encode, decode) |
| `moshi_codec_slots` | gauge | stage | batch slots of the replica (capacity) |
| `moshi_codec_slots_in_use` | gauge | stage | batch slots held by open streams |
| `moshi_codec_streams_started_total` | counter | stage | streams that got a slot |
| `moshi_codec_streams_refused_total` | counter | stage, reason | streams refused by the scheduler (reason = capacity, draining); refusals while loading/draining at the door show as `grpc_server_handled_total{grpc_code="UNAVAILABLE"}` |
| `moshi_codec_frames_total` | counter | stage | frames processed |
| `moshi_codec_batch_size` | histogram | stage | streams per batched model call |
| `moshi_codec_bucket_rows` | histogram | stage | rows stepped per call (the bucket) |
| `moshi_codec_queue_wait_seconds` | histogram | stage | frame arrival -> start of its batched model call |
| `moshi_codec_compute_seconds` | histogram | stage | wall time of one batched model call |
| `moshi_codec_frame_seconds` | histogram | stage | frame arrival -> result ready (service latency per frame) |
| `moshi_lm_streams_active` | gauge | | open Step streams |
| `moshi_lm_slots` | gauge | | batch slots of the replica (capacity) |
| `moshi_lm_slots_in_use` | gauge | | batch slots held by open streams |
| `moshi_lm_streams_started_total` | counter | | streams that got a slot |
| `moshi_lm_streams_refused_total` | counter | reason | streams refused by the scheduler (capacity, draining) |
| `moshi_lm_frames_total` | counter | | LM steps processed (one per input frame, replayed steps included) |
| `moshi_lm_batch_size` | histogram | | streams per batched LM step |
| `moshi_lm_bucket_rows` | histogram | | rows stepped per LM step (the bucket) |
| `moshi_lm_queue_wait_seconds` | histogram | | frame arrival -> start of its batched step |
| `moshi_lm_compute_seconds` | histogram | | wall time of one batched LM step (temporal + depth) |
| `moshi_lm_frame_seconds` | histogram | | frame arrival -> result ready (service latency per frame) |
| `moshi_lm_replayed_steps_total` | counter | | history steps replayed on open (failover) |
| `moshi_lm_prompt_ready_seconds` | histogram | | persona models: session open -> its prompt in the model (prefill or cache) |
| `moshi_lm_prefix_cache_lookups_total` | counter | result | persona models: prompt lookups in the prefix cache (hit, voice_hit, miss) |
| `moshi_lm_prefix_cache_bytes` | gauge | | persona models: bytes the cached prefixes take (host memory) |
| `moshi_lm_prefix_cache_entries` | gauge | | persona models: cached prefixes |
| `moshi_lm_prefix_cache_evictions_total` | counter | | persona models: prefixes evicted to stay under --prefix-cache-mib |
| `moshi_gateway_sessions_active` | gauge | | live Converse sessions |
| `moshi_gateway_sessions_started_total` | counter | | sessions admitted |
| `moshi_gateway_sessions_refused_total` | counter | reason | sessions refused (capacity, budget, draining, invalid, backend_unavailable, per_client, wrong_model) |
| `moshi_gateway_sessions_ended_total` | counter | reason | sessions ended, by the summary's reason (client_closed, deadline_exceeded, backend_failed, cancelled, idle_timeout, max_session_length, text_policy, error) |
| `moshi_gateway_frames_total` | counter | | output frames sent to clients (silence replacements included) |
| `moshi_gateway_frame_latency_seconds` | histogram | | per frame: its last input byte at the gateway -> its output written to the client; a late frame when its real output reached the gateway (or the session ended); dropped frames not observed |
| `moshi_gateway_stage_seconds` | histogram | stage | per-frame time in one backend call as the gateway sees it (encode, step, decode) |
| `moshi_gateway_budget_misses_total` | counter | | frames sent as silence because their output missed the per-frame budget (late); stalled drops, which also count toward the miss streak, are `frames_dropped_total{reason="stalled"}` |
| `moshi_gateway_frames_dropped_total` | counter | reason | output frames sent as silence instead of the backends' output (budget: missed the deadline; overflow: input dropped, client ahead of real time; stalled: input dropped while a backend stage was not answering) |
| `moshi_gateway_time_to_first_audio_seconds` | histogram | | session start -> first audio chunk sent |
| `moshi_gateway_session_wall_audio_ratio` | histogram | | per session at its end: session wall time / duration of the audio frames sent back (about 1 for live input, below 1 for a file streamed with flow control) |
| `moshi_gateway_admission_estimate_seconds` | histogram | | predicted frame latency of each admitted session on the replicas it got (encode + step + decode at its bucket, batching wait, one tick, network) |
| `moshi_gateway_failovers_total` | counter | service, result | sessions moved to another replica (service = lm: codec sessions are never moved; result = ok, failed) |
| `moshi_gateway_backends_healthy` | gauge | service | backend replicas currently considered healthy |
| `moshi_gateway_text_policy_actions_total` | counter | action | text pieces through the text safety hook (pass, redact, mute, end) |
| `moshi_gateway_voice_encode_seconds` | histogram | | time to encode a persona's voice on a codec replica (inline voices every session, named ones once) |
| `moshi_gateway_prompt_ready_seconds` | histogram | | a persona session's LM open sent -> the LM's PromptReady (the prompt in the model) |
| `moshi_gateway_persona_sessions_total` | counter | voice, cached | persona sessions that went live (voice = named, inline; cached = true when the whole prompt came from the LM's prefix cache) |
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# Per-frame latency: dense around the 80 ms frame and the 100/200 ms budgets.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.0,
    5.0,
)
# Model calls and queue waits: sub-millisecond (echo, tiny) up to seconds (7B on CPU).
COMPUTE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.1,
    0.2,
    0.5,
    1.0,
    2.5,
    10.0,
)
# Whole RPCs: unary calls (ms) to conversations (minutes).
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TTFA_BUCKETS = (0.08, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 5.0)
# Persona prompts: a cached prefix (milliseconds) to a long voice encoded and prefilled on CPU.
PROMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def new_registry() -> CollectorRegistry:
    """A fresh registry for one server (never the global default).

    Also turns off prometheus_client's `*_created` series (process-wide switch): they double
    the exposition size and no dashboard or alert of ours reads them."""
    disable_created_metrics()
    return CollectorRegistry(auto_describe=True)


@dataclass
class RpcMetrics:
    """The standard gRPC server metrics (go-grpc-prometheus names), filled by the interceptor."""

    started: Counter
    handled: Counter
    handling_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RpcMetrics:
        base = ["grpc_service", "grpc_method", "grpc_type"]
        return cls(
            started=Counter(
                "grpc_server_started_total",
                "RPCs started on the server.",
                base,
                registry=registry,
            ),
            handled=Counter(
                "grpc_server_handled_total",
                "RPCs completed on the server, by gRPC status code.",
                [*base, "grpc_code"],
                registry=registry,
            ),
            handling_seconds=Histogram(
                "grpc_server_handling_seconds",
                "RPC duration until the server sent its status (whole stream for streams).",
                base,
                buckets=RPC_BUCKETS,
                registry=registry,
            ),
        )


@dataclass
class ServerMetrics:
    """Per-process lifecycle metrics shared by all three services."""

    service: str
    build_info: Gauge
    ready: Gauge
    draining: Gauge
    model_load_seconds: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry, service: str) -> ServerMetrics:
        m = cls(
            service=service,
            build_info=Gauge(
                "moshi_build_info",
                "Always 1: the version, model and configuration this replica runs.",
                ["service", "version", "model", "config", "device", "dtype"],
                registry=registry,
            ),
            ready=Gauge(
                "moshi_server_ready",
                "1 once the model is loaded and the server admits streams.",
                ["service"],
                registry=registry,
            ),
            draining=Gauge(
                "moshi_server_draining",
                "1 while the server drains (finishes live streams, refuses new ones).",
                ["service"],
                registry=registry,
            ),
            model_load_seconds=Gauge(
                "moshi_model_load_seconds",
                "Seconds it took to load the model at start-up.",
                ["service"],
                registry=registry,
            ),
        )
        m.ready.labels(service).set(0)
        m.draining.labels(service).set(0)
        return m

    def set_build_info(
        self, *, version: str, model: str, config: str, device: str, dtype: str
    ) -> None:
        self.build_info.labels(self.service, version, model, config, device, dtype).set(1)


@dataclass
class BatcherMetrics:
    """The metrics one batching scheduler updates, already bound to its labels.

    `refused(reason)` returns the counter child for a refusal reason.
    """

    streams_active: Any
    slots: Any
    slots_in_use: Any
    streams_started: Any
    frames: Any
    batch_size: Any
    bucket_rows: Any
    queue_wait_seconds: Any
    compute_seconds: Any
    frame_seconds: Any
    _refused: Counter
    _refused_labels: tuple[str, ...]

    def refused(self, reason: str) -> Any:
        return self._refused.labels(*self._refused_labels, reason)


def _batcher_family(
    registry: CollectorRegistry, prefix: str, what: str, labels: list[str]
) -> dict[str, Any]:
    """Create the metric families of one service's schedulers (codec: per stage; lm: none)."""
    return {
        "streams_active": Gauge(
            f"{prefix}_streams_active", f"Open {what} streams.", labels, registry=registry
        ),
        "slots": Gauge(
            f"{prefix}_slots", "Batch slots of this replica (capacity).", labels, registry=registry
        ),
        "slots_in_use": Gauge(
            f"{prefix}_slots_in_use", "Batch slots held by open streams.", labels, registry=registry
        ),
        "streams_started": Counter(
            f"{prefix}_streams_started_total",
            f"{what} streams that got a batch slot.",
            labels,
            registry=registry,
        ),
        "refused": Counter(
            f"{prefix}_streams_refused_total",
            f"{what} streams refused by the scheduler (reason = capacity, draining).",
            [*labels, "reason"],
            registry=registry,
        ),
        "frames": Counter(f"{prefix}_frames_total", "Frames processed.", labels, registry=registry),
        "batch_size": Histogram(
            f"{prefix}_batch_size",
            "Streams per batched model call.",
            labels,
            buckets=BATCH_BUCKETS,
            registry=registry,
        ),
        "bucket_rows": Histogram(
            f"{prefix}_bucket_rows",
            "Rows stepped per batched model call: the smallest bucket of the ladder holding "
            "the live sessions with a frame (what the call cost, vs batch_size: what it served).",
            labels,
            buckets=BATCH_BUCKETS,
            registry=registry,
        ),
        "queue_wait_seconds": Histogram(
            f"{prefix}_queue_wait_seconds",
            "Frame arrival to the start of the batched model call that took it.",
            labels,
            buckets=COMPUTE_BUCKETS,
            registry=registry,
        ),
        "compute_seconds": Histogram(
            f"{prefix}_compute_seconds",
            "Wall time of one batched model call.",
            labels,
            buckets=COMPUTE_BUCKETS,
            registry=registry,
        ),
        "frame_seconds": Histogram(
            f"{prefix}_frame_seconds",
            "Frame arrival to its result being ready (service latency per frame).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
    }


def _bind(family: dict[str, Any], label_values: tuple[str, ...]) -> BatcherMetrics:
    bound = {
        k: (v.labels(*label_values) if label_values else v)
        for k, v in family.items()
        if k != "refused"
    }
    return BatcherMetrics(**bound, _refused=family["refused"], _refused_labels=label_values)


@dataclass
class CodecMetrics:
    """Codec service metrics: one bound scheduler set per stage (encode, decode)."""

    encode: BatcherMetrics
    decode: BatcherMetrics

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CodecMetrics:
        family = _batcher_family(registry, "moshi_codec", "Encode/Decode", ["stage"])
        return cls(encode=_bind(family, ("encode",)), decode=_bind(family, ("decode",)))


@dataclass
class LmMetrics:
    """LM service metrics: the scheduler set, replayed history steps, persona prompts."""

    step: BatcherMetrics
    replayed_steps: Counter
    prompt_ready_seconds: Histogram
    registry: CollectorRegistry

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LmMetrics:
        family = _batcher_family(registry, "moshi_lm", "Step", [])
        return cls(
            step=_bind(family, ()),
            replayed_steps=Counter(
                "moshi_lm_replayed_steps_total",
                "History steps replayed when a session was opened with replay (failover).",
                registry=registry,
            ),
            prompt_ready_seconds=Histogram(
                "moshi_lm_prompt_ready_seconds",
                "Persona models: from a session's open to its prompt in the model.",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                registry=registry,
            ),
            registry=registry,
        )

    def watch_prefix_cache(self, stats: Any) -> None:
        """Export a prefix cache's figures, read at scrape time from `stats()` (a
        `CacheStats`: the cache counts, the metrics only read)."""
        self.registry.register(_PrefixCacheCollector(stats))


class _PrefixCacheCollector:
    def __init__(self, stats: Any) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        lookups = CounterMetricFamily(
            "moshi_lm_prefix_cache_lookups",
            "Persona models: prompt lookups in the prefix cache.",
            labels=["result"],
        )
        lookups.add_metric(["hit"], st.hits)
        lookups.add_metric(["voice_hit"], st.voice_hits)
        lookups.add_metric(["miss"], st.misses)
        yield lookups
        yield GaugeMetricFamily(
            "moshi_lm_prefix_cache_bytes",
            "Persona models: bytes the cached prompt prefixes take (host memory).",
            value=st.bytes,
        )
        yield GaugeMetricFamily(
            "moshi_lm_prefix_cache_entries",
            "Persona models: cached prompt prefixes.",
            value=st.entries,
        )
        yield CounterMetricFamily(
            "moshi_lm_prefix_cache_evictions",
            "Persona models: prefixes evicted to stay under --prefix-cache-mib.",
            value=st.evictions,
        )


class LoopHistogram:
    """One histogram series observed only from one event loop's thread: `observe` is a
    bisect and two additions, without the locks of prometheus_client's `Histogram` (which
    cost several times as much per frame on the gateway's hot path). A scrape from the
    metrics thread reads the counts under the GIL; it may see an observation's bucket
    before its sum, never a count going down."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # upper bounds, +Inf last
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class LoopHistogramFamily:
    """A histogram family of `LoopHistogram` series, exposed through the public custom
    collector API with the same samples a prometheus_client `Histogram` of that name,
    help, labels and buckets exposes (`_bucket`, `_count`, `_sum`; `_created` is off, see
    `new_registry`). `labels(...)` and `observe(...)` as on a `Histogram`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = (*(float(b) for b in buckets), float("inf"))
        self._les = tuple(floatToGoString(b) for b in self._bounds)
        self._series: dict[tuple[str, ...], LoopHistogram] = {}
        if not self.labelnames:  # an unlabelled histogram is exposed from the start
            self._series[()] = LoopHistogram(self._bounds)
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogram:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            series = self._series.setdefault(key, LoopHistogram(self._bounds))
        return series

    def observe(self, amount: float) -> None:
        self._series[()].observe(amount)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, series in list(self._series.items()):
            total = series.sum
            cumulative = 0
            buckets = []
            for le, count in zip(self._les, list(series.counts), strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(key), buckets, total)
        yield family


@dataclass
class GatewayMetrics:
    """Gateway metrics (used by moshi_grpc.services.gateway; defined here with the rest)."""

    sessions_active: Gauge
    sessions_started: Counter
    sessions_refused: Counter
    sessions_ended: Counter
    frames: Counter
    # Observed per frame on the event loop: `LoopHistogramFamily` (same exposition).
    frame_latency_seconds: LoopHistogramFamily
    stage_seconds: LoopHistogramFamily
    budget_misses: Counter
    frames_dropped: Counter
    time_to_first_audio_seconds: Histogram
    session_wall_audio_ratio: Histogram
    admission_estimate_seconds: Histogram
    failovers: Counter
    backends_healthy: Gauge
    text_policy_actions: Counter
    voice_encode_seconds: Histogram
    prompt_ready_seconds: Histogram
    persona_sessions: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        r = registry
        return cls(
            sessions_active=Gauge(
                "moshi_gateway_sessions_active", "Live Converse sessions.", registry=r
            ),
            sessions_started=Counter(
                "moshi_gateway_sessions_started_total", "Sessions admitted.", registry=r
            ),
            sessions_refused=Counter(
                "moshi_gateway_sessions_refused_total",
                "Sessions refused at admission (reason = capacity, budget, draining, invalid, "
                "backend_unavailable, per_client, wrong_model).",
                ["reason"],
                registry=r,
            ),
            sessions_ended=Counter(
                "moshi_gateway_sessions_ended_total",
                "Sessions ended, by the reason their summary gives (client_closed, "
                "deadline_exceeded, backend_failed, cancelled, idle_timeout, "
                "max_session_length, text_policy, error).",
                ["reason"],
                registry=r,
            ),
            frames=Counter(
                "moshi_gateway_frames_total",
                "Output frames sent to clients (silence replacements included).",
                registry=r,
            ),
            frame_latency_seconds=LoopHistogramFamily(
                "moshi_gateway_frame_latency_seconds",
                "Per frame: its last input byte at the gateway to its output written to the "
                "client. A late frame is observed when its real output reached the gateway "
                "(after silence was sent for it), or at the session's end if it never did; "
                "dropped frames are not observed.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            stage_seconds=LoopHistogramFamily(
                "moshi_gateway_stage_seconds",
                "Per-frame time of one backend call as the gateway sees it "
                "(stage = encode, step, decode).",
                ["stage"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            budget_misses=Counter(
                "moshi_gateway_budget_misses_total",
                "Frames sent as silence because their output missed the per-frame budget "
                "(late). Stalled drops, which also count toward the miss streak, are "
                "frames_dropped_total{reason=stalled}.",
                registry=r,
            ),
            frames_dropped=Counter(
                "moshi_gateway_frames_dropped_total",
                "Output frames sent as silence instead of the backends' output (reason = budget: "
                "missed its deadline; overflow: input dropped, the client ahead of real time; "
                "stalled: input dropped while a backend stage was not answering).",
                ["reason"],
                registry=r,
            ),
            time_to_first_audio_seconds=Histogram(
                "moshi_gateway_time_to_first_audio_seconds",
                "Session start to the first audio chunk sent.",
                buckets=TTFA_BUCKETS,
                registry=r,
            ),
            session_wall_audio_ratio=Histogram(
                "moshi_gateway_session_wall_audio_ratio",
                "Per session at its end: session wall time / duration of the audio frames sent "
                "back (about 1 for live input; below 1 for a file streamed with flow control).",
                buckets=RTF_BUCKETS,
                registry=r,
            ),
            admission_estimate_seconds=Histogram(
                "moshi_gateway_admission_estimate_seconds",
                "Predicted frame latency of each admitted session on the replicas it got "
                "(encode + step + decode at its bucket, batching wait, one tick, network).",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            failovers=Counter(
                "moshi_gateway_failovers_total",
                "Sessions moved to another replica (service = lm: codec sessions are never "
                "moved; result = ok, failed).",
                ["service", "result"],
                registry=r,
            ),
            backends_healthy=Gauge(
                "moshi_gateway_backends_healthy",
                "Backend replicas currently considered healthy (service = codec, lm).",
                ["service"],
                registry=r,
            ),
            text_policy_actions=Counter(
                "moshi_gateway_text_policy_actions_total",
                "Text pieces through the text safety hook, by action (pass, redact, mute, end).",
                ["action"],
                registry=r,
            ),
            voice_encode_seconds=Histogram(
                "moshi_gateway_voice_encode_seconds",
                "Time to encode a persona's voice on a codec replica (inline voices every "
                "session, named voices once).",
                buckets=PROMPT_BUCKETS,
                registry=r,
            ),
            prompt_ready_seconds=Histogram(
                "moshi_gateway_prompt_ready_seconds",
                "A persona session's LM open sent to the LM's PromptReady (its prompt in the "
                "model).",
                buckets=PROMPT_BUCKETS,
                registry=r,
            ),
            persona_sessions=Counter(
                "moshi_gateway_persona_sessions_total",
                "Persona sessions that went live (voice = named, inline; cached = whether the "
                "whole prompt came from the LM's prefix cache).",
                ["voice", "cached"],
                registry=r,
            ),
        )


# Every metric family name defined above (deploy files and docs are checked against it).
METRIC_NAMES: tuple[str, ...] = tuple(
    line.split("`")[1]
    for line in (__doc__ or "").splitlines()
    if line.startswith("| `") and line.count("`") >= 2
)


class MetricsHttpServer:
    """`/metrics` over HTTP for one registry, on a daemon thread (port 0 = ephemeral)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = int(self._httpd.server_port)
        self.host = host
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsHttpServer:
    """Serve `registry` on http://host:port/metrics; `.port` is the bound port."""
    return MetricsHttpServer(registry, host, port)
