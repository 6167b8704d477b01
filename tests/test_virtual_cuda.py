"""The tools of tests/virtual_cuda.py, each shown to catch a planted mistake of its kind.

The virtual CUDA device must (1) compute exactly what the CPU computes, with real aliasing,
(2) refuse what CUDA refuses (devices mixed) everywhere, and (3) inside `strict()` (a
captured step) refuse every host read and transfer, while allowing them outside, as CUDA
does. The graph emulation must replay a sound step like eager and go stale where a step
baked a host value into its capture.
"""

from __future__ import annotations

import pytest
import torch
from virtual_cuda import (
    CPU_BUILD,
    DeviceMismatchError,
    EagerBucketGraphs,
    EmulatedBucketGraphs,
    EmulatedGraph,
    GraphCaptureError,
    HostSyncError,
    VirtualCuda,
    VirtualTensor,
)


@pytest.fixture
def vc():
    if not CPU_BUILD:
        pytest.skip("a CPU build of torch (on a CUDA build the gpu-marked tests run)")
    with VirtualCuda() as v:
        yield v


# ---- a device that says cuda and computes on the CPU ---------------------------------------


def test_cuda_tensors_are_virtual_and_compute_like_the_cpu(vc) -> None:
    cpu = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    made = [
        torch.zeros(3, device="cuda"),
        torch.arange(3, device=torch.device("cuda")),
        torch.tensor([1, 2, 3], device="cuda"),
        cpu.to("cuda"),
        cpu.cuda(),
        torch.empty_like(cpu, device="cuda"),
    ]
    for t in made:
        assert isinstance(t, VirtualTensor) and t.device == torch.device("cuda", 0) and t.is_cuda
    x = cpu.to("cuda")
    y = (x.softmax(-1) @ x.t()).topk(2, dim=-1).values
    assert isinstance(y, VirtualTensor) and y.device.type == "cuda"
    assert torch.equal(y.cpu(), (cpu.softmax(-1) @ cpu.t()).topk(2, dim=-1).values)
    assert torch.zeros(2, device="cuda:1").device == torch.device("cuda", 1)
    assert x.tolist() == cpu.tolist() and int(x[0, 0] > 0) == int(cpu[0, 0] > 0)


def test_views_and_in_place_ops_share_storage(vc) -> None:
    state = torch.zeros(4, 3, device="cuda")
    row = state[2]
    row.add_(1)  # through a view
    state[0] = state[2]  # setitem from a row of itself
    state[torch.tensor([1, 3], device="cuda"), 1] = 7.0  # advanced-index write
    same = state.view(12)
    same.mul_(2)
    assert torch.equal(state.cpu(), torch.tensor([[2, 2, 2], [0, 14, 0], [2, 2, 2], [0, 14, 0.0]]))
    assert state.add_(0) is state  # in-place ops return the same tensor
    with pytest.raises(NotImplementedError, match="metadata"):
        state.unsqueeze_(0)


def test_model_to_cuda_moves_parameters_and_buffers(vc) -> None:
    torch.manual_seed(0)
    cpu = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    x = torch.randn(2, 3)
    want = cpu(x)
    moved = cpu.to("cuda")
    for p in moved.parameters():
        assert isinstance(p, torch.nn.Parameter) and isinstance(p, VirtualTensor)
    assert all(isinstance(b, VirtualTensor) for b in moved.buffers())
    assert torch.equal(moved(x.to("cuda")).cpu(), want)


@pytest.mark.skipif(not CPU_BUILD, reason="a CPU build of torch")
def test_a_virtual_tensor_outside_its_context_is_refused() -> None:
    with VirtualCuda():
        t = torch.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match="outside its VirtualCuda context"):
        t + 1


# ---- what CUDA refuses anywhere -------------------------------------------------------------


def test_a_tensor_created_on_the_wrong_device_is_caught(vc) -> None:
    """The planted mistake: a step builds an index without `device=`."""

    def step(x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[-1])  # on the CPU

    with pytest.raises(DeviceMismatchError, match=r"CPU tensor of shape \(4,\)"):
        step(torch.zeros(2, 4, device="cuda"))
    step(torch.zeros(2, 4))  # the same code on the CPU is fine: only a device shows it


MIXED = {
    "cpu operand": lambda x: x * torch.ones(4),
    "cpu out of where": lambda x: torch.where(x > 0, x, torch.zeros(4)),
    "two devices": lambda x: x + torch.zeros(4, device="cuda:1"),
    "cpu index_select": lambda x: x.index_select(0, torch.tensor([0, 1])),
    "cpu gather": lambda x: x.gather(0, torch.tensor([0, 1])),
    "cpu generator": lambda x: torch.randn(4, device="cuda", generator=torch.Generator()),
    "cpu matmul": lambda x: x @ torch.ones(4),
}


@pytest.mark.parametrize("mistake", list(MIXED))
def test_mixed_devices_raise(vc, mistake) -> None:
    with pytest.raises(DeviceMismatchError):
        MIXED[mistake](torch.ones(4, device="cuda"))


def test_what_cuda_allows_is_allowed(vc) -> None:
    x = torch.arange(4.0, device="cuda")
    assert torch.equal((x * torch.tensor(2.0)).cpu(), torch.arange(4.0) * 2)  # a 0-dim CPU scalar
    assert torch.equal(x[torch.tensor([3, 0])].cpu(), torch.tensor([3.0, 0]))  # CPU index
    assert torch.equal(x[x > 1].cpu(), torch.tensor([2.0, 3]))  # a sync, fine outside a step
    assert x.sum().item() == 6.0 and bool(x[1] > 0)


# ---- inside a captured step: no host reads, no transfers ------------------------------------

HOST = {
    ".item()": lambda x: x.sum().item(),
    ".tolist()": lambda x: x.tolist(),
    "int(t)": lambda x: int(x[0]),
    "float(t)": lambda x: float(x[0]),
    "bool(t)": lambda x: bool(x[0] > 0),
    "if t:": lambda x: 1 if x.any() else 0,
    "torch.equal": lambda x: torch.equal(x, x),
    ".cpu()": lambda x: x.cpu(),
    ".to('cpu')": lambda x: x.to("cpu"),
    ".to(cuda) of host data": lambda x: x + torch.ones(4).to(x.device),
    "torch.tensor(data, device=cuda)": lambda x: x + torch.tensor([1.0, 2, 3, 4], device=x.device),
    "copy_ from the host": lambda x: x.clone().copy_(torch.ones(4)),
    "copy_ to the host": lambda x: torch.zeros(4).copy_(x),
    "nonzero": lambda x: x.nonzero(),
    "torch.where(cond)": lambda x: torch.where(x > 1),
    "argwhere": lambda x: torch.argwhere(x),
    "repeat_interleave": lambda x: x.repeat_interleave(x.long()),
    "masked_select": lambda x: x.masked_select(x > 1),
    "boolean-mask indexing": lambda x: x[x > 1],
    "boolean-mask assignment": lambda x: x.clone().__setitem__(x > 1, x[:1]),
    "unique": lambda x: x.unique(),
    "CPU index tensor": lambda x: x[torch.tensor([0, 2])],
    "CPU index tensor assignment": lambda x: x.clone().index_put_((torch.tensor([1]),), x[:1]),
    "list index": lambda x: x[[0, 2]],
    "torch.cuda.synchronize": lambda x: torch.cuda.synchronize(),
}


@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
@pytest.mark.parametrize("read", list(HOST))
def test_host_reads_and_transfers_raise_inside_a_step_only(vc, read, inference) -> None:
    """(In inference mode, as the engines step, composite ops such as `item` reach the
    dispatch mode whole instead of as `_local_scalar_dense`.)"""
    with torch.inference_mode(inference):
        x = torch.arange(4.0, device="cuda")
        HOST[read](x)  # outside a captured step CUDA allows it
        with vc.strict(), pytest.raises(HostSyncError):
            HOST[read](x)


def test_a_sound_step_runs_in_strict_mode(vc) -> None:
    """What the serving steps do (state in place, where-masks, gathers, top-k, device
    constants) passes, so the checks above are not simply refusing everything."""
    state = torch.zeros(4, 8, device="cuda")
    pos = torch.zeros(4, dtype=torch.long, device="cuda")
    rows = torch.arange(4, device="cuda")
    with torch.inference_mode(), vc.strict():
        x = torch.randn(4, 8, device="cuda")
        active = torch.arange(4, device="cuda") % 2 == 0
        state[rows, :] = torch.where(active[:, None], x, state)
        pos.add_(active.long())
        top = state.topk(3, dim=-1).indices.gather(-1, (pos % 3)[:, None])
        out = torch.full_like(top, -1).masked_fill_(active[:, None], 0) + top
    assert out.device.type == "cuda" and pos.cpu().tolist() == [1, 0, 1, 0]


# ---- capture and replay, emulated ---------------------------------------------------------


def _stateful(state: torch.Tensor):
    def step(x: torch.Tensor) -> torch.Tensor:
        state.mul_(0.5).add_(x)  # persistent state, written in place
        wide = state.to(torch.float64)  # annotated as a view of `state`, returns a copy
        flat = wide.t().reshape(-1)  # a view op that must copy here
        rows = torch.arange(state.shape[0], device=state.device)  # a constant of the step
        return flat.view(state.shape[1], -1).sum(0) + rows

    return step


@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
def test_replay_equals_eager_and_capture_runs_nothing(inference) -> None:
    """(In inference mode, as the engines step, `to` and `reshape` reach the recorder as
    themselves: view ops by their schema that here return copies.)"""
    g = torch.Generator().manual_seed(0)
    replayed = torch.randn(3, 4, generator=g)
    eager, before = replayed.clone(), replayed.clone()
    static = torch.zeros(3, 4)
    with torch.inference_mode(inference):
        graph = EmulatedGraph.capture(_stateful(replayed), (static,))
        assert torch.equal(replayed, before)  # a CUDA capture runs nothing
        assert graph.outputs[0].isnan().all()  # the pool is garbage until the first replay
        step = _stateful(eager)
        for _ in range(5):
            x = torch.randn(3, 4, generator=g)
            static.copy_(x)
            graph.replay()
            assert torch.equal(graph.outputs[0], step(x))
            assert torch.equal(replayed, eager)


class Host:
    """Host-side values a step may (wrongly) read: a counter and a flag."""

    def __init__(self) -> None:
        self.steps = 0
        self.flag = False


PLANTED = {
    # a Python int read from the host mirror: baked at capture
    "host int": lambda h, s, x: s.add_(x * h.steps),
    # a tensor built from host data during the step: a constant of the graph
    "tensor from host data": lambda h, s, x: s.add_(x * torch.tensor(float(h.steps))),
    # a Python branch on host state: the branch taken at capture is all the graph holds
    "host branch": lambda h, s, x: s.add_(x) if h.flag else s.sub_(x),
}


@pytest.mark.parametrize("mistake", list(PLANTED))
def test_a_host_value_baked_in_at_capture_goes_stale_on_replay(mistake) -> None:
    """Eager (each call re-reads the host) and replay agree at first, then the replay keeps
    using what the host held at capture."""
    plant = PLANTED[mistake]
    host = Host()
    states = {"eager": torch.zeros(2), "graph": torch.zeros(2)}

    def step_for(name: str):
        return lambda shape, x: plant(host, states[name], x).clone()

    eager = EagerBucketGraphs(step_for("eager"), warmup_iters=0)
    graphs = EmulatedBucketGraphs(step_for("graph"), warmup_iters=0)
    for g in (eager, graphs):
        g.capture(1, "any", (torch.zeros(2),))
    diverged = []
    for t in range(4):
        host.steps, host.flag = t, t % 2 == 1
        x = torch.full((2,), 1.0 + t)
        diverged.append(not torch.equal(eager.run(1, (x,))[0], graphs.run(1, (x,))[0]))
    assert not diverged[0] and any(diverged[1:]), diverged


def test_state_rebound_instead_of_written_in_place_is_not_seen_by_replay() -> None:
    holder = {"state": torch.zeros(2)}
    graph = EmulatedGraph.capture(lambda x: holder["state"].add_(x).clone(), (torch.ones(2),))
    holder["state"] = torch.full((2,), 5.0)  # a reset that rebinds: the graph keeps the old one
    graph.replay()
    assert torch.equal(graph.outputs[0], torch.ones(2))  # eager would give 6


def test_capture_refuses_host_reads_and_outputs_that_are_not_the_steps_own() -> None:
    state = torch.zeros(2)
    with pytest.raises(GraphCaptureError, match="reads the device"):
        EmulatedGraph.capture(lambda x: x * int(x.sum()), (torch.ones(2),))
    with pytest.raises(GraphCaptureError, match="existed before capture"):
        EmulatedGraph.capture(lambda x: state.add_(x), (torch.ones(2),))
    assert torch.equal(state, torch.zeros(2))  # restored after the refused capture too


def test_graphs_share_a_pool_running_one_invalidates_the_others_outputs() -> None:
    graphs = EmulatedBucketGraphs(lambda shape, x: x * 2, warmup_iters=1)
    graphs.capture(1, "one", (torch.ones(1),))
    graphs.capture(2, "two", (torch.ones(2),))
    (one,) = graphs.run(1, (torch.ones(1),))
    assert torch.equal(one, torch.full((1,), 2.0))
    graphs.run(2, (torch.ones(2),))
    assert one.isnan().all()  # read after another graph ran: garbage, as on a device


def test_capture_and_replay_on_the_virtual_device_in_strict_mode(vc) -> None:
    """The two tools together: a sound step recorded and replayed on virtual CUDA with no
    host read; a replay equals the eager step."""
    state = torch.zeros(3, 4, device="cuda")
    twin = torch.zeros(3, 4, device="cuda")
    static = torch.zeros(3, 4, device="cuda")
    with torch.inference_mode(), vc.strict():
        graph = EmulatedGraph.capture(_stateful(state), (static,))
    step = _stateful(twin)
    for t in range(3):
        x = torch.full((3, 4), float(t), device="cuda")
        static.copy_(x)
        with torch.inference_mode(), vc.strict():
            graph.replay()
            want = step(x)
        assert torch.equal(graph.outputs[0].cpu(), want.cpu())


def _capture_with_torch_cuda(step, static: torch.Tensor):
    """A capture the way torch documents it (and `BucketGraphs` does it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static)
    return graph, out


def test_torch_cuda_graph_api_captures_and_replays_on_the_virtual_device(vc) -> None:
    state, twin = torch.zeros(3, 4, device="cuda"), torch.zeros(3, 4, device="cuda")
    static = torch.zeros(3, 4, device="cuda")
    with torch.inference_mode():
        graph, out = _capture_with_torch_cuda(_stateful(state), static)
        step = _stateful(twin)
        step(static)
        assert torch.equal(state.cpu(), twin.cpu())  # the warm-up ran, the capture did not
        for t in range(3):
            x = torch.full((3, 4), float(t), device="cuda")
            static.copy_(x)
            graph.replay()
            assert torch.equal(out.cpu(), step(x).cpu())
        with torch.cuda.graph(torch.cuda.CUDAGraph()), pytest.raises(GraphCaptureError):
            state.sum().item()  # a capture refuses host reads
        with torch.cuda.graph(torch.cuda.CUDAGraph()), pytest.raises(HostSyncError):
            state.cpu()  # and transfers (it runs in strict mode)


def test_a_capture_on_another_devices_stream_is_refused(vc) -> None:
    """The planted mistake: the model on cuda:1, captured while cuda:0 is current (its
    kernels would run at once on cuda:1's stream and the graph would hold none)."""
    state = torch.zeros(2, 2, device="cuda:1")
    static = torch.zeros(2, 2, device="cuda:1")
    with pytest.raises(GraphCaptureError, match="cuda:1 while the graph captures cuda:0"):
        _capture_with_torch_cuda(_stateful(state), static)
    with torch.cuda.device(1):
        graph, out = _capture_with_torch_cuda(_stateful(state), static)
    graph.replay()
    assert out.device == torch.device("cuda", 1)
