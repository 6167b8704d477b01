"""The codec engine: one Mimi replica, an encode scheduler and a decode scheduler.

Layering: models (torch) <- this engine (slots, batching) <- servicer (proto <-> engine).
Each scheduler owns one streaming state of `max_sessions` rows; an Encode stream and a
Decode stream each hold a slot of their own kind, so one conversation uses one of each.
A tick steps only the smallest bucket of rows holding the streams with a frame
(services/common/buckets.py), so compute follows load, not capacity.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moshi_grpc.services.common.batching import (
    DEFAULT_IDLE_PROBE_S,
    DEFAULT_MAX_SESSIONS,
    BatchScheduler,
)
from moshi_grpc.services.common.buckets import RowTable
from moshi_grpc.services.common.cuda_graphs import BucketGraphs, use_cuda_graphs
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
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_wait_ms: float = 5.0
    inject_delay_ms: float = 0.0
    seed: int = 0
    cuda_graphs: str = "auto"  # "auto" (on for CUDA) | "on" | "off"
    cpu_forms: str = "auto"  # auto | on | off (see moshi_grpc/models/cpu_fast.py)
    warmup_repeats: int = 3  # timed warm-up steps per bucket at load (after an untimed one)
    idle_probe_s: float = DEFAULT_IDLE_PROBE_S


def load_codec_model(options: CodecOptions) -> Any:
    """The Mimi model (or its echo stand-in) described by `options`."""
    if options.model == "echo":
        from moshi_grpc.services.codec.echo import EchoMimi

        return EchoMimi(num_codebooks=options.num_codebooks)
    if options.model != "real":
        raise ValueError(f"unknown codec model {options.model!r} (real or echo)")
    if options.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {options.dtype!r}; one of {', '.join(DTYPES)}")
    from moshi_grpc.models.cpu_fast import prepare_mimi_for_cpu
    from moshi_grpc.models.mimi import load_mimi

    mimi = load_mimi(
        options.weights,
        device=options.device,
        dtype=DTYPES[options.dtype],
        num_codebooks=options.num_codebooks,
        config=options.config,
        seed=options.seed,
    )
    if mimi.device.type == "cpu":  # faster exact kernels, chosen here; the plain model elsewhere
        prepare_mimi_for_cpu(mimi, options.cpu_forms)
    return mimi


class StreamerRunner:
    """Adapts a Mimi streaming encoder/decoder to the scheduler's BatchRunner protocol.

    Live streams are packed into the streamer's rows [0, live) (`RowTable`): a join takes
    row `live` and resets it; a leave moves the last live row into the freed one. A tick
    steps only rows [0, bucket), the smallest bucket of the ladder holding every row with a
    frame: its input is (bucket, ...), frames at their rows, zeros elsewhere. Rows of live
    streams without a frame are masked (state kept); when there are none, the step runs
    unmasked (the host decides this from the plan, never from tensor values).

    With `graphs` (CUDA), each bucket's step is captured at warm-up, unmasked and (from
    bucket 2) masked, and ticks replay it (`BucketGraphs`).
    """

    def __init__(
        self,
        streamer: Any,
        num_slots: int,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        graphs: bool = False,
        log_rows: int = 4096,
    ) -> None:
        self.streamer = streamer
        self.num_slots = num_slots
        self.table = RowTable(num_slots)
        self.ladder = self.table.ladder
        self._row_shape = row_shape
        self._dtype = dtype  # of the payloads
        mimi = streamer.mimi
        self.device = torch.device(mimi.device)
        # what the step takes: pcm in the model dtype, codes as int64
        self._step_dtype = mimi.dtype if dtype.is_floating_point else torch.long
        self.graphs = BucketGraphs(self._step) if graphs else None
        self.rows_log: deque[int] = deque(maxlen=log_rows)  # rows passed to the model per call

    def _step(self, x: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        return (self.streamer.step_unchecked(x, active),)

    @torch.inference_mode()
    def join(self, slot: int, open_payload: Any) -> None:
        self.streamer.reset_rows([self.table.join(slot)])

    @torch.inference_mode()
    def leave(self, slot: int) -> None:
        move = self.table.leave(slot)
        if move is not None:
            self.streamer.move_row(move.src, move.dst)

    @torch.inference_mode()
    def run(
        self, slots: Sequence[int], payloads: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], int]:
        plan = self.table.plan(slots)
        b = plan.bucket
        rows = torch.tensor(plan.rows, dtype=torch.long)
        x = torch.zeros((b, *self._row_shape), dtype=self._dtype)
        x.index_copy_(0, rows, torch.stack(list(payloads)).to(self._dtype))
        active = None
        if plan.masked:
            active = torch.zeros(b, dtype=torch.bool)
            active[rows] = True
        self.rows_log.append(b)
        if self.graphs is not None:
            key = (b, active is not None)
            if key not in self.graphs:  # capture steps real rows: only at load
                raise RuntimeError(f"no CUDA graph for bucket {b}: warm_up() every bucket first")
            (out,) = self.graphs.run(key, (x,) if active is None else (x, active))
        else:
            x = x.to(self.device, self._step_dtype)
            (out,) = self._step(x, None if active is None else active.to(self.device))
        picked = out.index_select(0, rows.to(out.device)).cpu()
        return list(picked.unbind(0)), b

    @torch.inference_mode()
    def warm_up(self, bucket: int) -> None:
        """One step of rows [0, bucket) (free: at load), then those rows reset. With graphs,
        the first call per bucket captures its graphs (masked too, from bucket 2)."""
        if self.table.live:
            raise RuntimeError("warm up before any stream joins")
        x = torch.zeros((bucket, *self._row_shape), device=self.device, dtype=self._step_dtype)
        if self.graphs is not None:
            if (bucket, False) not in self.graphs:
                self.graphs.capture((bucket, False), (x,))
                if bucket > 1:
                    active = torch.ones(bucket, dtype=torch.bool, device=self.device)
                    self.graphs.capture((bucket, True), (x, active))
            self.graphs.run((bucket, False), (x,))
        else:
            self._step(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.streamer.reset_rows(range(bucket))


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
