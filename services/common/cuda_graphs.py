"""CUDA graphs of a replica's step, one per bucket and static shape, captured at load.

Without graphs a 7B LM step launches ~1,000 kernels from Python, tens of milliseconds of
host time; replaying a captured graph launches them all at once. A step can be captured
when, for a given bucket, its shapes are fixed and it never waits on the device (no
`.item()`, `.tolist()`, `nonzero`, branches on tensor values, CPU RNG): the engines' steps
are written that way, and CPU tests check it (tests/test_cuda_paths_on_cpu.py runs them on a
virtual CUDA device and emulates capture and replay; `torch.compile(fullgraph=True)` traces
every bucket).

The step must write its persistent state in place (the graph replays the same addresses);
its inputs are copied into static buffers before each replay and its outputs are the
graph's static buffers, valid until the next replay of any graph of the same pool.

Everything runs on the model's device, which need not be the current one (`--device
cuda:1`): the side stream, the warm-up and the capture are made under
`torch.cuda.device(device)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence

import torch

log = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("auto", "on", "off")


def use_cuda_graphs(mode: str, device: str | torch.device) -> bool:
    """Resolve `--cuda-graphs auto|on|off` for a replica on `device` (auto = on for CUDA)."""
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(
            f"--cuda-graphs must be one of {', '.join(CUDA_GRAPH_MODES)}, got {mode!r}"
        )
    on_cuda = torch.device(device).type == "cuda"
    if mode == "on" and not on_cuda:
        raise ValueError("--cuda-graphs on needs --device cuda")
    return mode == "on" or (mode == "auto" and on_cuda)


Outputs = tuple[torch.Tensor, ...]


class BucketGraphs:
    """Captured graphs of `step(key, *inputs) -> tuple of tensors`, one per key (a bucket
    and the step's static shape), on `device`.

    All graphs share one memory pool: only one of them runs at a time (one stepping thread
    per replica), so their temporaries can share memory.
    """

    def __init__(
        self,
        step: Callable[..., Outputs],
        device: torch.device | str,
        warmup_iters: int = 2,
    ) -> None:
        self.step = step
        self.device = torch.device(device)
        self.warmup_iters = warmup_iters
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Outputs, Outputs]] = {}
        self._pool = None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, key: Hashable, shape: Hashable, example: Sequence[torch.Tensor]) -> None:
        """Warm `step(shape, ...)` up on a side stream, then capture it with static copies of
        `example` (on the device).

        The warm-up and the capture run the step for real on the given rows' state: call this
        before any session holds those rows (at load), and reset the rows afterwards.
        """
        with torch.cuda.device(self.device):
            static_in = tuple(t.to(self.device).clone() for t in example)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    self.step(shape, *static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.step(shape, *static_in)
        if isinstance(out, torch.Tensor):
            out = (out,)
        self._pool = graph.pool()
        self._graphs[key] = (graph, static_in, tuple(out))
        log.debug("captured CUDA graph %s on %s", key, self.device)

    def run(self, key: Hashable, inputs: Sequence[torch.Tensor]) -> Outputs:
        """Copy `inputs` into the graph's static buffers and replay it; its static outputs."""
        graph, static_in, out = self._graphs[key]
        with torch.cuda.device(self.device):  # the runner thread's current device may differ
            for buf, x in zip(static_in, inputs, strict=True):
                buf.copy_(x, non_blocking=True)
            graph.replay()
        return out
