"""The codec engine: one Mimi replica, an encode scheduler and a decode scheduler.

Layering: models (torch) <- this engine (slots, batching) <- servicer (proto <-> engine).
Each scheduler owns one streaming state of `max_sessions` rows; an Encode stream and a
Decode stream each hold a slot of their own kind, so one conversation uses one of each.
A tick steps only the smallest bucket of rows holding the streams with a frame
(services/common/buckets.py), so compute follows load, not capacity.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moshi_grpc.services.common.batching import BatchScheduler
from moshi_grpc.services.common.buckets import TickPlan
from moshi_grpc.services.common.cuda_graphs import use_cuda_graphs
from moshi_grpc.services.common.device import exact_float32, torch_dtype
from moshi_grpc.services.common.metrics import BatcherMetrics, CodecMetrics
from moshi_grpc.services.common.options import BackendOptions
from moshi_grpc.services.common.runner import RowRunner

log = logging.getLogger(__name__)


@dataclass
class CodecOptions(BackendOptions):
    """Settings of a codec replica (the CLI flags)."""

    config: str = "mimi"
    num_codebooks: int = 8


def load_codec_model(options: CodecOptions) -> Any:
    """The Mimi model (or its echo stand-in) described by `options`."""
    if options.model == "echo":
        from moshi_grpc.services.codec.echo import EchoMimi

        return EchoMimi(num_codebooks=options.num_codebooks)
    if options.model != "real":
        raise ValueError(f"unknown codec model {options.model!r} (real or echo)")
    dtype = torch_dtype(options.dtype)
    from moshi_grpc.models.cpu_fast import prepare_mimi_for_cpu
    from moshi_grpc.models.mimi import load_mimi

    exact_float32(options.device, dtype)
    mimi = load_mimi(
        options.weights,
        device=options.device,
        dtype=dtype,
        num_codebooks=options.num_codebooks,
        config=options.config,
        seed=options.seed,
    )
    if mimi.device.type == "cpu":  # faster exact kernels, chosen here; the plain model elsewhere
        prepare_mimi_for_cpu(mimi, options.cpu_forms)
    return mimi


class StreamerRunner(RowRunner):
    """A Mimi streaming encoder or decoder as a `RowRunner`.

    A tick's input is `(bucket, *row_shape)`: frames at their rows, zeros elsewhere. Rows of
    live streams without a frame are masked (state kept); when there are none, the step runs
    unmasked (the host decides this from the plan, never from tensor values). In graph mode
    each bucket's step is captured unmasked and (from bucket 2) masked.
    """

    def __init__(
        self,
        streamer: Any,
        num_rows: int,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        graphs: bool = False,
    ) -> None:
        mimi = streamer.mimi
        super().__init__(num_rows, mimi.device, graphs)
        self.streamer = streamer
        self._row_shape = row_shape
        # what the step takes: pcm in the model dtype, codes as int64
        self._step_dtype = mimi.dtype if dtype.is_floating_point else torch.long

    def reset_row(self, row: int, payload: Any) -> None:
        self.streamer.reset_rows([row])

    def move_row(self, src: int, dst: int) -> None:
        self.streamer.move_row(src, dst)

    def shape(self, plan: TickPlan, payloads: Sequence[torch.Tensor]) -> bool:
        return plan.masked

    def warm_shapes(self, bucket: int) -> list[bool]:
        return [False, True] if bucket > 1 else [False]

    def inputs(
        self, plan: TickPlan, payloads: Sequence[torch.Tensor], masked: bool
    ) -> tuple[torch.Tensor, ...]:
        rows = torch.tensor(plan.rows, dtype=torch.long)
        x = torch.zeros((plan.bucket, *self._row_shape), dtype=self._step_dtype)
        x.index_copy_(0, rows, torch.stack(list(payloads)).to(self._step_dtype))
        if not masked:
            return (x,)
        active = torch.zeros(plan.bucket, dtype=torch.bool)
        active[rows] = True
        return x, active

    def example_inputs(self, bucket: int, masked: bool) -> tuple[torch.Tensor, ...]:
        x = torch.zeros((bucket, *self._row_shape), dtype=self._step_dtype)
        return (x, torch.ones(bucket, dtype=torch.bool)) if masked else (x,)

    def step(
        self, masked: bool, x: torch.Tensor, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor]:
        return (self.streamer.step_unchecked(x, active),)

    def results(
        self, plan: TickPlan, outputs: tuple[torch.Tensor, ...], payloads: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        (out,) = outputs
        rows = torch.tensor(plan.rows, dtype=torch.long, device=out.device)
        return list(out.index_select(0, rows).cpu().unbind(0))


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
        self.graphs = use_cuda_graphs(options.cuda_graphs, mimi.device)

        def scheduler(streamer, shape, dtype, name, m: BatcherMetrics | None) -> BatchScheduler:
            return BatchScheduler(
                StreamerRunner(streamer, n, shape, dtype, graphs=self.graphs),
                name=name,
                max_wait_s=options.max_wait_ms / 1000.0,
                metrics=m,
                inject_delay_s=options.inject_delay_ms / 1000.0,
                idle_probe_s=options.idle_probe_s,
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
        # every bucket stepped (and on CUDA captured) before the service reports SERVING;
        # the timings go into Info for the gateway's admission
        self.encoder.warm_up(options.warmup_repeats)
        self.decoder.warm_up(options.warmup_repeats)

    @property
    def model_name(self) -> str:
        return "mimi-echo" if self.options.model == "echo" else "mimi"

    def start(self) -> None:
        self.encoder.start()
        self.decoder.start()

    def close(self) -> None:
        self.encoder.close()
        self.decoder.close()
