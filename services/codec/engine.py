"""The codec engine: one Mimi replica, an encode scheduler and a decode scheduler.

Layering: models (torch) <- this engine (slots, batching) <- servicer (proto <-> engine).
Each scheduler owns one streaming state of `max_sessions` slots; an Encode stream and a
Decode stream each hold a slot of their own kind, so one conversation uses one of each.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moshi_grpc.services.common.batching import BatchScheduler
from moshi_grpc.services.common.metrics import BatcherMetrics, CodecMetrics

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CodecOptions:
    """Model and batching settings of a codec replica (the CLI flags)."""

    model: str = "real"  # "real" | "echo"
    weights: str | None = None
    config: str = "mimi"
    device: str = "cpu"
    dtype: str = "float32"
    num_codebooks: int = 8
    max_sessions: int = 16
    max_wait_ms: float = 5.0
    inject_delay_ms: float = 0.0
    seed: int = 0


def load_codec_model(options: CodecOptions) -> Any:
    """The Mimi model (or its echo stand-in) described by `options`."""
    if options.model == "echo":
        from moshi_grpc.services.codec.echo import EchoMimi

        return EchoMimi(num_codebooks=options.num_codebooks)
    if options.model != "real":
        raise ValueError(f"unknown codec model {options.model!r} (real or echo)")
    if options.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {options.dtype!r}; one of {', '.join(DTYPES)}")
    from moshi_grpc.models.mimi import load_mimi

    return load_mimi(
        options.weights,
        device=options.device,
        dtype=DTYPES[options.dtype],
        num_codebooks=options.num_codebooks,
        config=options.config,
        seed=options.seed,
    )


class StreamerRunner:
    """Adapts a Mimi streaming encoder/decoder to the scheduler's BatchRunner protocol."""

    def __init__(self, streamer: Any, num_slots: int, row_shape: tuple[int, ...], dtype) -> None:
        self.streamer = streamer
        self.num_slots = num_slots
        self._row_shape = row_shape
        self._dtype = dtype

    @torch.inference_mode()
    def join(self, slot: int, open_payload: Any) -> None:
        self.streamer.reset([slot])

    @torch.inference_mode()
    def run(self, slots: Sequence[int], payloads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.zeros((self.num_slots, *self._row_shape), dtype=self._dtype)
        index = torch.tensor(list(slots), dtype=torch.long)
        x[index] = torch.stack(list(payloads))
        active = torch.zeros(self.num_slots, dtype=torch.bool)
        active[index] = True
        out = self.streamer.step(x, active)
        return list(out[index.to(out.device)].detach().cpu().unbind(0))


class CodecEngine:
    """One Mimi replica with batched streaming encode and decode."""

    def __init__(
        self,
        mimi: Any,
        options: CodecOptions,
        metrics: CodecMetrics | None = None,
    ) -> None:
        self.mimi = mimi
        self.options = options
        n = options.max_sessions
        k = mimi.num_codebooks

        def scheduler(streamer, shape, dtype, name, m: BatcherMetrics | None) -> BatchScheduler:
            return BatchScheduler(
                StreamerRunner(streamer, n, shape, dtype),
                name=name,
                max_wait_s=options.max_wait_ms / 1000.0,
                metrics=m,
                inject_delay_s=options.inject_delay_ms / 1000.0,
            )

        self.encoder = scheduler(
            mimi.streaming_encoder(n),
            (mimi.frame_size,),
            torch.float32,
            "codec-encode",
            metrics.encode if metrics else None,
        )
        self.decoder = scheduler(
            mimi.streaming_decoder(n),
            (k,),
            torch.long,
            "codec-decode",
            metrics.decode if metrics else None,
        )

    @property
    def model_name(self) -> str:
        return "mimi-echo" if self.options.model == "echo" else "mimi"

    def start(self) -> None:
        self.encoder.start()
        self.decoder.start()

    def close(self) -> None:
        self.encoder.close()
        self.decoder.close()
