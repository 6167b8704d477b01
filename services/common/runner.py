"""The data plane's one contract: slots -> packed rows -> a bucket's step, eager or replayed.

Both backends run the same loop: the scheduler (batching.py) hands a tick's frames to a
`RowRunner`, which

1. maps each stream's slot to the row where its state lies (`RowTable`, the one home of row
   liveness: it keeps the live sessions packed into rows [0, live) and says which row moves
   when one leaves),
2. picks the smallest bucket of the ladder holding the rows with a frame and the step's
   static shape (the model adapter decides it: masked or not for Mimi, the attention span
   and sampling widths for the LM),
3. runs the model's device step on rows [0, bucket): eagerly, or by replaying the graph
   captured for (bucket, shape) at load (`BucketGraphs`), the same way for every model,
4. hands the outputs back per stream.

A model plugs in by subclassing and providing the hooks below (`reset_row`, `move_row`,
`free_row`, `shape`, `warm_shapes`, `inputs`, `example_inputs`, `step`, `results`). The
step must be capturable: static shapes for a given (bucket, shape), state written in place,
no host read.

`warm_up(bucket)` runs every shape a tick of that bucket may take (capturing it first in
graph mode) on free rows before any stream joins, and returns the time of the step alone
(host inputs in, outputs back on the host, the device synchronised; resets and capture not
included): what a tick of that bucket costs, as admission needs it.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from moshi_grpc.services.common.buckets import RowTable, TickPlan
from moshi_grpc.services.common.cuda_graphs import BucketGraphs
from moshi_grpc.services.common.device import synchronize

Tensors = tuple[torch.Tensor, ...]


class RowRunner:
    """The scheduler's `BatchRunner` over one model's batched state (see module docstring)."""

    def __init__(self, num_slots: int, device: torch.device | str, graphs: bool) -> None:
        self.num_slots = num_slots
        self.table = RowTable(num_slots)
        self.ladder = self.table.ladder
        self.device = torch.device(device)
        self.graphs = BucketGraphs(self.step, self.device) if graphs else None

    # -- what a model adapter provides ------------------------------------------------------

    def reset_row(self, row: int, payload: Any) -> None:
        """Start a new stream's state in `row` (the stream's open payload)."""
        raise NotImplementedError

    def move_row(self, src: int, dst: int) -> None:
        """Move the state of row `src` into row `dst` (a leave's compaction)."""
        raise NotImplementedError

    def free_row(self, row: int) -> None:
        """`row` holds no stream any more (nothing to do for stateless rows)."""

    def shape(self, plan: TickPlan, payloads: Sequence[Any]) -> Hashable:
        """The static shape of this tick's step (in graph mode: one that was captured)."""
        raise NotImplementedError

    def warm_shapes(self, bucket: int) -> list[Hashable]:
        """Every shape a tick of `bucket` may take (each is captured in graph mode); the
        first is the one whose time `warm_up` reports."""
        raise NotImplementedError

    def inputs(self, plan: TickPlan, payloads: Sequence[Any], shape: Hashable) -> Tensors:
        """The step's inputs for rows [0, plan.bucket), built on the host."""
        raise NotImplementedError

    def example_inputs(self, bucket: int, shape: Hashable) -> Tensors:
        """Inputs of a warm-up step of `bucket` rows, every row stepped."""
        raise NotImplementedError

    def step(self, shape: Hashable, *inputs: torch.Tensor) -> Tensors:
        """The device step of rows [0, B) (B = the inputs' first dimension)."""
        raise NotImplementedError

    def results(self, plan: TickPlan, outputs: Tensors, payloads: Sequence[Any]) -> list[Any]:
        """One result per stepped stream, in the order of `plan.rows`, copied off the
        outputs (in graph mode they are the graph's buffers, overwritten by the next tick)."""
        raise NotImplementedError

    def prepare_rows(self, bucket: int) -> None:
        """Make rows [0, bucket) steppable for a warm-up (at load, no stream joined)."""

    # -- the contract the scheduler drives --------------------------------------------------

    @torch.inference_mode()
    def join(self, slot: int, payload: Any) -> None:
        self.reset_row(self.table.join(slot), payload)

    @torch.inference_mode()
    def leave(self, slot: int) -> None:
        row = self.table.find_row(slot)
        if row is None:
            return  # left before its join was applied
        move = self.table.leave(slot)
        if move is None:
            self.free_row(row)
        else:
            self.move_row(move.src, move.dst)
            self.free_row(move.src)

    @torch.inference_mode()
    def run(self, slots: Sequence[int], payloads: Sequence[Any]) -> tuple[list[Any], int]:
        plan = self.table.plan(slots)
        shape = self.shape(plan, payloads)
        outputs = self.call(plan.bucket, shape, self.inputs(plan, payloads, shape))
        return self.results(plan, outputs, payloads), plan.bucket

    def call(self, bucket: int, shape: Hashable, inputs: Tensors) -> Tensors:
        """Run the step of `bucket` rows: replay its graph, or run it eagerly."""
        if self.graphs is not None:
            key = (bucket, shape)
            if key not in self.graphs:  # capture steps real rows: only at load
                raise RuntimeError(
                    f"no CUDA graph for bucket {bucket} ({shape}): warm_up() every bucket first"
                )
            return self.graphs.run(key, inputs)
        return self.step(shape, *(t.to(self.device, non_blocking=True) for t in inputs))

    @torch.inference_mode()
    def warm_up(self, bucket: int) -> float:
        """Step `bucket` free rows once per shape (capturing each first in graph mode); the
        seconds of the first shape's step alone (see the module docstring)."""
        if self.table.live:
            raise RuntimeError("warm up before any stream joins")
        timed = None
        for shape in self.warm_shapes(bucket):
            self.prepare_rows(bucket)
            example = self.example_inputs(bucket, shape)
            if self.graphs is not None and (bucket, shape) not in self.graphs:
                self.graphs.capture((bucket, shape), shape, example)
                self.prepare_rows(bucket)  # the capture stepped the rows
            synchronize(self.device)
            start = time.perf_counter()
            outputs = self.call(bucket, shape, example)
            for t in outputs:
                t.cpu()  # a tick takes its results to the host (this also synchronises)
            synchronize(self.device)
            if timed is None:
                timed = time.perf_counter() - start
        for row in range(bucket):
            self.free_row(row)
        return timed
