"""The gateway's per-frame histograms (`LoopHistogramFamily`) expose exactly what a
prometheus_client `Histogram` of the same name, help, labels and buckets exposes."""

from __future__ import annotations

import pytest
from prometheus_client import Histogram, generate_latest

from moshi_grpc.services.common.metrics import (
    LATENCY_BUCKETS,
    GatewayMetrics,
    LoopHistogramFamily,
    new_registry,
)

# On bucket bounds, between them, below the first and above the last (+Inf).
VALUES = [0.0, 0.005, 0.0051, 0.08, 0.0799, 0.2, 3.0, 10.0, 11.5, 0.013]


def _pair(labelnames: tuple[str, ...]):
    ours, theirs = new_registry(), new_registry()
    args = ("moshi_test_seconds", "A test histogram.", labelnames)
    fast = LoopHistogramFamily(*args, buckets=LATENCY_BUCKETS, registry=ours)
    slow = Histogram(*args, buckets=LATENCY_BUCKETS, registry=theirs)
    return ours, theirs, fast, slow


def test_unlabelled_exposition_matches_prometheus_histogram() -> None:
    ours, theirs, fast, slow = _pair(())
    assert generate_latest(ours) == generate_latest(theirs)  # empty: zero buckets
    for v in VALUES:
        fast.observe(v)
        slow.observe(v)
    assert generate_latest(ours) == generate_latest(theirs)
    assert ours.get_sample_value("moshi_test_seconds_count") == len(VALUES)


def test_labelled_exposition_matches_prometheus_histogram() -> None:
    ours, theirs, fast, slow = _pair(("stage",))
    assert generate_latest(ours) == generate_latest(theirs)  # no series before labels()
    for i, v in enumerate(VALUES):
        stage = ("encode", "step", "decode")[i % 3]
        fast.labels(stage).observe(v)
        slow.labels(stage).observe(v)
    assert generate_latest(ours) == generate_latest(theirs)
    assert fast.labels("encode") is fast.labels("encode")
    with pytest.raises(ValueError, match="expected labels"):
        fast.labels("encode", "extra")


def test_gateway_registry_names_are_unchanged() -> None:
    registry = new_registry()
    m = GatewayMetrics.create(registry)
    m.frame_latency_seconds.observe(0.05)
    m.stage_seconds.labels("step").observe(0.01)
    text = generate_latest(registry).decode()
    assert 'moshi_gateway_frame_latency_seconds_bucket{le="0.08"} 1.0' in text
    assert 'moshi_gateway_stage_seconds_count{stage="step"} 1.0' in text
    assert "# TYPE moshi_gateway_stage_seconds histogram" in text


def test_sessions_ended_reasons_are_the_summary_reasons() -> None:
    """One vocabulary: the metric's documented labels are the end reasons, which are the
    summary's `reason` strings (the gateway labels the metric with `EndReason.value`)."""
    from moshi_grpc.services.common import metrics
    from moshi_grpc.services.gateway.ending import EndReason

    (row,) = [r for r in metrics.__doc__.splitlines() if "sessions_ended_total" in r]
    documented = row.rsplit("(", 1)[1].split(")")[0].split(", ")
    assert sorted(documented) == sorted(r.value for r in EndReason)
    registry = new_registry()
    help_text = GatewayMetrics.create(registry).sessions_ended._documentation
    assert all(r.value in help_text for r in EndReason)
