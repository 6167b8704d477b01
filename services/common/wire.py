"""Wire formats shared by the services: PCM frames as float32 LE bytes, codes as int lists.

Every check happens here, before a frame reaches a batch, so one bad frame can never fail
the batched model call of other streams.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moshi_grpc.services.common.batching import Timing
from moshi_grpc.services.common.errors import InvalidInput
from moshi_grpc.v1 import common_pb2


def parse_pcm(data: bytes, frame_size: int) -> torch.Tensor:
    """float32 LE bytes -> tensor (frame_size,); InvalidInput for a wrong size or NaN/Inf."""
    expected = frame_size * 4
    if len(data) != expected:
        raise InvalidInput(
            f"pcm_f32le must be {expected} bytes ({frame_size} float32 samples), "
            f"got {len(data)} bytes"
        )
    samples = np.frombuffer(data, dtype="<f4")
    if not np.isfinite(samples).all():
        bad = int(np.size(samples) - np.isfinite(samples).sum())
        raise InvalidInput(f"pcm_f32le contains {bad} NaN/Inf sample(s)")
    return torch.from_numpy(samples.astype(np.float32, copy=True))


def parse_codes(codes: Any, num_codebooks: int, cardinality: int, field: str) -> torch.Tensor:
    """repeated int32 -> tensor (K,); InvalidInput for a wrong count or out-of-range code."""
    if len(codes) != num_codebooks:
        raise InvalidInput(f"{field} must hold {num_codebooks} codes, got {len(codes)}")
    values = np.fromiter(codes, dtype=np.int64, count=num_codebooks)
    bad = (values < 0) | (values >= cardinality)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidInput(f"{field}[{i}] = {int(values[i])} is out of range [0, {cardinality})")
    return torch.from_numpy(values)


def pcm_bytes(pcm: torch.Tensor) -> bytes:
    return pcm.detach().to(torch.float32).cpu().numpy().astype("<f4", copy=False).tobytes()


def timing_proto(timing: Timing) -> common_pb2.ServerTiming:
    """A frame's `Timing` (where its time went on the server) as the wire's `ServerTiming`."""
    return common_pb2.ServerTiming(
        queue_ms=timing.queue_s * 1000.0,
        compute_ms=timing.compute_s * 1000.0,
        batch_size=timing.batch_size,
    )


def bucket_timings(scheduler: Any, stage: str) -> list[common_pb2.BucketTiming]:
    """`BackendInfo.buckets` entries of one scheduler (warm-up and recent medians per bucket)."""
    return [
        common_pb2.BucketTiming(
            batch_size=bucket,
            stage=stage,
            warm_ms=warm,
            recent_p50_ms=recent,
            recent_count=count,
        )
        for bucket, warm, recent, count in scheduler.bucket_timings()
    ]
