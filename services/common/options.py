"""What every backend replica is configured with (the engines read it; no gRPC here)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from moshi_grpc.services.common.batching import DEFAULT_IDLE_PROBE_S, DEFAULT_MAX_SESSIONS

__all__ = ["BackendOptions", "backend_options"]


@dataclass
class BackendOptions:
    """Model and batching settings every backend replica takes (the CLI flags); the codec's
    and the LM's options add their own."""

    model: str = "real"  # "real" | "echo"
    weights: str | None = None
    config: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_wait_ms: float = 5.0
    inject_delay_ms: float = 0.0
    seed: int = 0
    cuda_graphs: str = "auto"  # auto (on for CUDA) | on | off (services/common/cuda_graphs.py)
    cpu_forms: str = "auto"  # auto | on | off (moshi_grpc/models/cpu_fast.py)
    warmup_repeats: int = 3  # timed warm-up steps per bucket at load (after an untimed one)
    idle_probe_s: float = DEFAULT_IDLE_PROBE_S


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `BackendOptions` fields a backend's flags give (`add_batching_flags`,
    `add_model_flags`), by name."""
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "max_sessions": args.max_sessions,
        "max_wait_ms": args.max_wait_ms,
        "inject_delay_ms": args.inject_delay_ms,
        "idle_probe_s": args.idle_probe_s,
        "cuda_graphs": args.cuda_graphs,
        "cpu_forms": args.cpu_forms,
    }
