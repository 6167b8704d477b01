"""Test tools: a virtual CUDA device on a CPU build of torch, and CUDA graph capture and
replay emulated on the CPU.

Why: the serving core is written for GPU nodes (state on the device, captured steps) and
the project's machines have no GPU. These tools run the real code paths as a GPU would see
them, and fail where a GPU would.

`VirtualCuda` (a context manager). Inside it, `torch.zeros(3, device="cuda")`,
`x.to("cuda")`, `model.to("cuda")` and the loaders' `device="cuda:1"` give `VirtualTensor`s:
tensors whose device is `cuda:N` (their TensorImpl says so, so torch's own C++ code, e.g. a
composite op's `empty(..., self.options())`, places what it makes there too) and whose data
is a real CPU tensor (`elem`). Every op runs on the CPU tensors; views and in-place ops act
on the same CPU storage, so state written in place behaves as on a device. Two layers:
- a `TorchDispatchMode` sees every aten op: it rewrites `device=cuda` factory arguments to
  the CPU, unwraps, runs, wraps the outputs, and raises `DeviceMismatchError` where CUDA
  would: a CUDA tensor beside a CPU tensor of dim > 0 (0-dim CPU tensors are scalars and
  allowed; CPU index tensors are allowed by `index`/`index_put_`, as on CUDA), two CUDA
  devices, a CPU generator for a CUDA random op;
- a `TorchFunctionMode` runs the few Python bindings that open a CUDA device guard before
  any dispatch (`__getitem__`, `__setitem__`, `int()`, `copy_`, `nonzero`, ...: on a CPU
  build they fail with "PyTorch is not linked with support for cuda devices") on
  CPU-reporting stand-ins of the same storage, and makes the transfers (`.to`, `.cuda`,
  `.cpu`, `.tolist`, `torch.tensor(..., device=...)`) aten copies the dispatch mode sees.
`torch.cuda._lazy_init` returns early for the duration (it does while `torch.cuda._tls` has
`is_initializing`); `torch.cuda.synchronize` records the devices it is asked to wait for.

Inside `vc.strict()` (a captured step) every host read and transfer raises `HostSyncError`:
`_local_scalar_dense` (`.item()`, `.tolist()`, `int(t)`, `bool(t)`), `torch.equal`, copies
between CPU and CUDA either way (a copy from pinned memory could be captured, but its replays
would read that host buffer again: a step takes its inputs as device tensors), ops with
data-dependent output shapes (`nonzero`, `masked_select`, boolean-mask indexing, `unique`,
...), CPU index tensors indexing a CUDA tensor, `torch.cuda.synchronize()`.

Moving a model: `model.to("cuda")` inside the context. The context turns on torch's
`overwrite_module_params_on_conversion`, so `Module._apply` stores a new `Parameter` per
parameter (a `VirtualTensor` holding a CPU copy, marked as a parameter) and a new buffer per
buffer, instead of swapping the new data into the old CPU parameter (`param.data = ...`
would leave a CUDA TensorImpl with no CPU data behind it); module attributes that are
neither are not moved (as with a real `.to`).

`EmulatedGraph` / `EmulatedBucketGraphs`: capture records one call of a step as the aten ops
it runs, with every tensor by identity (static inputs, persistent state, parameters and the
tensors the step makes), refuses host reads, and restores whatever the recording run wrote
to memory that existed before it (a CUDA capture runs nothing); the step's own tensors are
then filled with garbage (a graph's pool holds nothing until replayed). Replay re-runs the
recorded ops on the same tensors and copies each op's fresh result into the tensor recorded
for it (a CUDA graph replays its kernels on the same addresses). Whatever the step took from
the host at capture (a Python int, a tensor built from host data, a branch) is baked into
the recording, so replay goes stale where eager does not. Replaying one graph of an
`EmulatedBucketGraphs` invalidates the outputs of the others (one memory pool, as in
`BucketGraphs`).

Limits: no CUDA kernel runs, so a kernel missing for a dtype on CUDA, numerics and timings
are out of reach; autograd is not emulated (a virtual tensor never requires grad:
`requires_grad_` on one is ignored, which lets `Module.to` store its parameters); in-place
ops that change a virtual tensor's metadata (`resize_`, `unsqueeze_`, ...) are refused; the
modes are per thread; a CUDA build of torch is refused (`CPU_BUILD`: its real device guards
would act on the virtual indices).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CPU_BUILD",
    "DeviceMismatchError",
    "EagerBucketGraphs",
    "EmulatedBucketGraphs",
    "EmulatedGraph",
    "GraphCaptureError",
    "HostSyncError",
    "VirtualCuda",
    "VirtualTensor",
]

aten = torch.ops.aten

# The virtual device stands in for CUDA on a CPU build only: a CUDA build has real device
# guards, which would act on the virtual device indices (the gpu-marked tests run there).
CPU_BUILD = torch.version.cuda is None and torch.version.hip is None


class DeviceMismatchError(RuntimeError):
    """An op mixes devices in a way CUDA rejects."""


class HostSyncError(RuntimeError):
    """A captured step (`VirtualCuda.strict`) reads the device from the host or transfers."""


class GraphCaptureError(RuntimeError):
    """A step did something during an emulated capture that a CUDA graph capture refuses."""


# ---- op classes ---------------------------------------------------------------------------

# Ops whose result is a host value read from the device. (In inference mode, as the engines
# step, composite ops such as `item` reach a dispatch mode whole, not decomposed.)
_HOST_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose}
# ops whose output shape depends on tensor values (CUDA syncs to size the output)
_DATA_DEPENDENT = {
    aten.nonzero,
    aten.nonzero_numpy,
    aten.argwhere,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.bincount,
}
# overloads of otherwise static ops whose output shape depends on tensor values
_DATA_DEPENDENT_OVERLOADS = {
    aten.where.default,  # torch.where(cond)
    aten.repeat_interleave.Tensor,  # (refused even with output_size, which would be static)
    aten.repeat_interleave.self_Tensor,
}


def _data_dependent(func: Any) -> bool:
    return func.overloadpacket in _DATA_DEPENDENT or func in _DATA_DEPENDENT_OVERLOADS


# ops that take a list of index tensors (CUDA accepts CPU index tensors and copies them in)
_INDEX_OPS = {
    aten.index,
    aten.index_put_,
    aten.index_put,
    aten._index_put_impl_,
    aten._unsafe_index,
    aten._unsafe_index_put,
}
# ops that read only the metadata of their tensor argument
_LIKE_OPS = {
    aten.empty_like,
    aten.zeros_like,
    aten.ones_like,
    aten.full_like,
    aten.rand_like,
    aten.randn_like,
    aten.randint_like,
    aten.new_empty,
    aten.new_empty_strided,
    aten.new_zeros,
    aten.new_ones,
    aten.new_full,
}


# ---- the tensors ----------------------------------------------------------------------------


class _Wrapper(torch.Tensor):
    """A tensor subclass holding its data in `elem` (a plain CPU tensor) for device `vdev`."""

    elem: torch.Tensor
    vdev: torch.device

    @staticmethod
    def _wrap(cls, elem: torch.Tensor, vdev: torch.device, impl_device: torch.device):
        # an inference tensor exactly when its data is one (a view of a normal tensor made
        # in inference mode is a normal tensor, and autograd's view tracking insists)
        inference = elem.is_inference()
        with (
            contextlib.nullcontext()
            if inference == torch.is_inference_mode_enabled()
            else torch.inference_mode(inference)
        ):
            out = torch.Tensor._make_wrapper_subclass(
                cls,
                elem.size(),
                strides=elem.stride(),
                storage_offset=elem.storage_offset(),
                dtype=elem.dtype,
                layout=elem.layout,
                device=impl_device,
                requires_grad=False,
            )
        out.elem = elem
        out.vdev = vdev
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            f"{func}: a virtual CUDA tensor was used outside its VirtualCuda context "
            "(convert results with .cpu() inside it)"
        )

    def __repr__(self) -> str:  # (repr of the data itself would be a host read)
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, {self.vdev})"


class VirtualTensor(_Wrapper):
    """A tensor on a virtual CUDA device: `device` is `cuda:N`, the data a CPU tensor."""

    def __new__(cls, elem: torch.Tensor, vdev: torch.device):
        return _Wrapper._wrap(cls, elem, vdev, vdev)


class _HostFacade(_Wrapper):
    """The same data reported as a CPU tensor, for the length of one Python binding call
    that would open a CUDA device guard (indexing, scalar conversion, ...). The dispatch
    mode treats it exactly like the `VirtualTensor` it stands for."""

    def __new__(cls, elem: torch.Tensor, vdev: torch.device):
        return _Wrapper._wrap(cls, elem, vdev, torch.device("cpu"))


def _is_virtual(x: Any) -> bool:
    return isinstance(x, _Wrapper)


def _elem(x: Any) -> Any:
    """The CPU tensor holding a virtual tensor's data; anything else as it is."""
    return x.elem if _is_virtual(x) else x


def _storage_key(t: torch.Tensor) -> int:
    return _elem(t).untyped_storage()._cdata


class _Stream:
    """A stream of the virtual device: work runs at once and in order, nothing to wait
    for; it only knows its device (what a capture on it records)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def wait_stream(self, other: _Stream) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<virtual stream on {self.device}>"


class _CudaGraph:
    """`torch.cuda.CUDAGraph` on the virtual device: an `EmulatedGraph` filled by
    `torch.cuda.graph(...)` (the stand-in below), replayed by `replay()`."""

    def __init__(self, api: _CudaApi) -> None:
        self._api = api
        self.emulated: EmulatedGraph | None = None
        self._pool: object | None = None

    def pool(self) -> object:
        if self._pool is None:
            raise RuntimeError("pool() before capture")
        return self._pool

    def replay(self) -> None:
        if self.emulated is None:
            raise RuntimeError("replay() before capture")
        for other in self._api.graphs:
            if other is not self and other._pool is self._pool and other.emulated is not None:
                other.emulated.invalidate()  # one pool: the others' memory is reused
        self.emulated.replay()

    def reset(self) -> None:
        self.emulated = None


class _CudaApi:
    """The `torch.cuda` calls a capture makes (streams, the current device, graphs), for
    the virtual device; installed by `VirtualCuda` for its duration."""

    NAMES = (
        "Stream",
        "current_stream",
        "stream",
        "device",
        "set_device",
        "current_device",
        "synchronize",
        "empty_cache",
        "mem_get_info",
        "CUDAGraph",
        "graph",
    )

    MEMORY = 80 * 2**30  # what `mem_get_info` reports for every virtual device: an H100

    def __init__(self, vc: VirtualCuda) -> None:
        self.vc = vc
        self.current: dict[int, _Stream] = {}
        self.graphs: list[_CudaGraph] = []
        self.Stream = self._new_stream  # (torch.cuda.Stream is a class; calling it is enough)
        self.CUDAGraph = self._new_graph

    def _index(self, device: Any) -> int:
        if device is None or device == -1:
            return self.vc.current
        if isinstance(device, int):
            return device
        return self.vc.device(device).index

    def _new_stream(self, device: Any = None, priority: int = 0) -> _Stream:
        return _Stream(torch.device("cuda", self._index(device)))

    def _new_graph(self, *args: Any, **kwargs: Any) -> _CudaGraph:
        graph = _CudaGraph(self)
        self.graphs.append(graph)
        return graph

    def current_stream(self, device: Any = None) -> _Stream:
        index = self._index(device)
        return self.current.setdefault(index, _Stream(torch.device("cuda", index)))

    def current_device(self) -> int:
        return self.vc.current

    def set_device(self, device: Any) -> None:
        self.vc.current = self._index(device)

    @contextlib.contextmanager
    def device(self, device: Any) -> Iterator[None]:
        before = self.vc.current
        self.vc.current = self._index(device)
        try:
            yield
        finally:
            self.vc.current = before

    @contextlib.contextmanager
    def stream(self, stream: _Stream | None) -> Iterator[None]:
        """The stream becomes its device's current stream, and its device the current
        device (as `torch.cuda.stream` does)."""
        if stream is None:
            yield
            return
        index = stream.device.index
        before_device, before_stream = self.vc.current, self.current.get(index)
        self.vc.current = index
        self.current[index] = stream
        try:
            yield
        finally:
            self.vc.current = before_device
            if before_stream is None:
                del self.current[index]
            else:
                self.current[index] = before_stream

    def synchronize(self, device: Any = None) -> None:
        self.vc._synchronize(device)

    def empty_cache(self) -> None:
        pass

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        """(free, total) bytes: the whole card free (nothing real is allocated on it)."""
        self._index(device)
        return self.MEMORY, self.MEMORY

    @contextlib.contextmanager
    def graph(
        self,
        cuda_graph: _CudaGraph,
        pool: object | None = None,
        stream: _Stream | None = None,
        capture_error_mode: str = "global",
    ) -> Iterator[None]:
        """Capture on `stream` (default: a new one on the current device) in strict mode:
        the ops inside are recorded into `cuda_graph`, not run (memory is restored)."""
        capture = stream or self._new_stream()
        emulated = EmulatedGraph(capture.device)
        with self.stream(capture), self.vc.strict(), emulated.recording():
            yield
        cuda_graph.emulated = emulated
        cuda_graph._pool = pool if pool is not None else object()


def _leaves(tree: Any, out: list | None = None) -> list:
    """The leaves of nested tuples, lists and dicts (what aten ops take and return); a
    plain walk, several times cheaper than torch's pytree on the hot path of every op."""
    if out is None:
        out = []
    if isinstance(tree, (list, tuple)):
        for x in tree:
            _leaves(x, out)
    elif isinstance(tree, dict):
        for x in tree.values():
            _leaves(x, out)
    else:
        out.append(tree)
    return out


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """`tree` with `fn` applied to every leaf (same container types)."""
    if isinstance(tree, list):
        return [_map(fn, x) for x in tree]
    if isinstance(tree, tuple):
        items = [_map(fn, x) for x in tree]
        if type(tree) is tuple:
            return tuple(items)
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of the whole storage under `t` (a CPU tensor, whatever `t` is)."""
    storage = _elem(t).untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))


# ---- the virtual device -------------------------------------------------------------------


class VirtualCuda:
    """Context manager: `device="cuda"` works on a CPU build and behaves like CUDA.

    `current` is the index `"cuda"` means (`torch.cuda.current_device()`). While active,
    the `torch.cuda` calls of a capture (`Stream`, `current_stream`, `stream`, `device`,
    `set_device`, `current_device`, `synchronize`, `empty_cache`, `CUDAGraph`, `graph`)
    are stand-ins for the virtual device: `torch.cuda.graph` records into an
    `EmulatedGraph` in strict mode and refuses ops on another device than its stream's.
    The devices passed to `synchronize` are recorded in `synchronized` (None: the current
    one, whichever that is).
    """

    def __init__(self, current: int = 0) -> None:
        self.current = current
        self.strict_depth = 0
        self.synchronized: list[torch.device | None] = []
        self._stack: contextlib.ExitStack | None = None

    # ---- entering ------------------------------------------------------------------------
    def __enter__(self) -> VirtualCuda:
        if not CPU_BUILD:
            raise RuntimeError("VirtualCuda stands in for CUDA on a CPU build of torch only")
        stack = contextlib.ExitStack()
        tls = torch.cuda._tls
        if not hasattr(tls, "is_initializing"):
            tls.is_initializing = True  # torch.cuda._lazy_init returns early
            stack.callback(delattr, tls, "is_initializing")
        api = _CudaApi(self)
        for name in api.NAMES:
            old = getattr(torch.cuda, name)
            setattr(torch.cuda, name, getattr(api, name))
            stack.callback(setattr, torch.cuda, name, old)
        # Module.to stores new Parameters instead of swapping data into the old ones
        # (`param.data = wrapper` would leave a CUDA TensorImpl without its CPU data)
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwrite)
        stack.enter_context(_Dispatch(self))
        stack.enter_context(_Functions(self))
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @contextlib.contextmanager
    def strict(self) -> Iterator[None]:
        """A captured step: any host read or host/device transfer raises HostSyncError."""
        self.strict_depth += 1
        try:
            yield
        finally:
            self.strict_depth -= 1

    # ---- helpers -------------------------------------------------------------------------
    def device(self, device: Any) -> torch.device | None:
        """`device` as torch.device, `cuda` with an index (None stays None)."""
        if device is None:
            return None
        if isinstance(device, int):  # torch.cuda.* take a bare index too
            device = f"cuda:{device}"
        dev = torch.device(device) if not isinstance(device, torch.device) else device
        if dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.current)
        return dev

    def _synchronize(self, device: Any = None) -> None:
        if self.strict_depth:
            raise HostSyncError("torch.cuda.synchronize() inside a captured step")
        self.synchronized.append(None if device is None else self.device(device))

    def _refuse(self, what: str) -> None:
        if self.strict_depth:
            raise HostSyncError(f"{what} inside a captured step")


# ---- dispatch: every aten op ------------------------------------------------------------


class _Dispatch(TorchDispatchMode):
    def __init__(self, vc: VirtualCuda) -> None:
        super().__init__()
        self.vc = vc

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is aten._to_copy:
            return self._to_copy(func, args, kwargs)
        if packet is aten.to:  # (whole, in inference mode)
            moved = self._to(func, args, kwargs)
            if moved is not None:
                return moved
        if packet is aten.copy_:
            return self._copy(func, args, kwargs)
        vc = self.vc
        leaves = _leaves((args, kwargs))
        virtual = [x for x in leaves if _is_virtual(x)]
        for x in leaves:
            if isinstance(x, torch.Tensor) and not _is_virtual(x) and x.device.type == "cuda":
                raise RuntimeError(
                    f"{func}: a CUDA tensor that holds no CPU data (made by swapping a virtual "
                    "tensor into a plain one: `t.data = ...`?)"
                )
        target = vc.device(kwargs.get("device"))
        to_cuda = target is not None and target.type == "cuda"
        if not virtual and not to_cuda:
            return func(*args, **kwargs)  # a plain CPU op
        devices = {x.vdev for x in virtual} | ({target} if to_cuda else set())
        if len(devices) > 1:
            names = ", ".join(sorted(str(d) for d in devices))
            raise DeviceMismatchError(f"{func}: expected all tensors on one device, got {names}")
        (vdev,) = devices
        self._check_host_tensors(func, packet, args, leaves)
        if vc.strict_depth:
            self._check_strict(func, packet, args)
        gen = kwargs.get("generator")
        if gen is not None and gen.device.type != "cuda":
            raise DeviceMismatchError(f"{func}: a {gen.device} generator for a CUDA tensor")
        unwrap = {id(x.elem): x for x in virtual}
        u_args, u_kwargs = _map(_elem, (args, kwargs))
        if to_cuda:
            u_kwargs = dict(u_kwargs, device=torch.device("cpu"))
        out = func(*u_args, **u_kwargs)
        if target is not None and not to_cuda:
            return out  # e.g. empty_like(cuda tensor, device="cpu")
        facade = bool(virtual) and all(isinstance(x, _HostFacade) for x in virtual)
        cls = _HostFacade if facade else VirtualTensor

        def wrap(o: Any) -> Any:
            if not isinstance(o, torch.Tensor):
                return o
            same = unwrap.get(id(o))
            if same is not None:  # in place / out=: the argument itself
                if tuple(same.shape) != tuple(o.shape) or same.stride() != o.stride():
                    raise NotImplementedError(
                        f"{func} changes a virtual tensor's metadata in place (not emulated)"
                    )
                return same
            return cls(o, vdev)

        return _map(wrap, out)

    def _check_host_tensors(self, func, packet, args, leaves) -> None:
        """CPU tensors of dim > 0 beside CUDA ones: an error, except index tensors (moved
        to the device by CUDA's index kernels) and the argument of a `*_like` factory."""
        allowed: set[int] = set()
        if packet in _INDEX_OPS and len(args) > 1:
            allowed = {id(t) for t in args[1] if isinstance(t, torch.Tensor)}
        if packet in _LIKE_OPS:
            allowed.add(id(args[0]))
        for x in leaves:
            if (
                isinstance(x, torch.Tensor)
                and not _is_virtual(x)
                and x.device.type == "cpu"
                and x.dim() > 0
                and id(x) not in allowed
            ):
                raise DeviceMismatchError(
                    f"{func}: expected all tensors on one device, got a CPU tensor of shape "
                    f"{tuple(x.shape)} beside CUDA tensors"
                )

    def _check_strict(self, func, packet, args) -> None:
        if packet in _HOST_READS:
            raise HostSyncError(f"{func} reads a CUDA tensor on the host (.item(), int(), ...)")
        if _data_dependent(func):
            raise HostSyncError(f"{func} has a data-dependent output shape (syncs)")
        if packet in _INDEX_OPS and len(args) > 1:
            for t in args[1]:
                if not isinstance(t, torch.Tensor):
                    continue
                if t.dtype in (torch.bool, torch.uint8):
                    raise HostSyncError(f"{func}: boolean-mask indexing (data-dependent shape)")
                if not _is_virtual(t):
                    raise HostSyncError(f"{func}: a CPU index tensor (host-to-device copy)")

    def _to(self, func, args, kwargs):
        """`aten.to` that changes device, as the `_to_copy` it stands for; None otherwise."""
        named = dict(zip((a.name for a in func._schema.arguments), args, strict=False))
        named.update(kwargs)
        src, other = named["self"], named.get("other")
        device = other.device if isinstance(other, torch.Tensor) else named.get("device")
        if device is None:
            return None
        dst = self.vc.device(device)
        if dst == (src.vdev if _is_virtual(src) else src.device):
            return None
        dtype = other.dtype if isinstance(other, torch.Tensor) else named.get("dtype")
        return self._to_copy(aten._to_copy.default, (src,), {"dtype": dtype, "device": dst})

    def _to_copy(self, func, args, kwargs):
        vc = self.vc
        src = args[0]
        target = vc.device(kwargs.get("device"))
        src_dev = src.vdev if _is_virtual(src) else src.device
        dst = target or src_dev
        if src_dev.type == "meta" or (src_dev.type != "cuda" and dst.type != "cuda"):
            return func(*args, **kwargs)
        if src_dev != dst:
            vc._refuse(f"a copy from {src_dev} to {dst}")
        out = func(_elem(src), *args[1:], **dict(kwargs, device=torch.device("cpu")))
        if dst.type != "cuda":
            return out
        return (_HostFacade if isinstance(src, _HostFacade) else VirtualTensor)(out, dst)

    def _copy(self, func, args, kwargs):
        dst, src = args[0], args[1]
        dst_dev = dst.vdev if _is_virtual(dst) else dst.device
        src_dev = src.vdev if _is_virtual(src) else src.device
        if dst_dev.type != "cuda" and src_dev.type != "cuda":
            return func(*args, **kwargs)
        if dst_dev != src_dev:
            self.vc._refuse(f"a copy from {src_dev} to {dst_dev}")
        func(_elem(dst), _elem(src), *args[2:], **kwargs)
        return dst


# ---- Python bindings that open a device guard, and the transfers ------------------------


def _facade(x: Any) -> Any:
    return _HostFacade(x.elem, x.vdev) if isinstance(x, VirtualTensor) else x


def _unfacade(x: Any) -> Any:
    return VirtualTensor(x.elem, x.vdev) if isinstance(x, _HostFacade) else x


# Python bindings that open a CUDA device guard before dispatching (found by trying the
# tensor methods and functions the models and engines use): run on CPU-reporting stand-ins.
# One missing here fails loudly, "PyTorch is not linked with support for cuda devices".
_GUARDED = {
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.__invert__,
    torch.Tensor.contiguous,
    torch.Tensor.copy_,
    torch.Tensor.nonzero,
    torch.nonzero,
}


class _Functions(TorchFunctionMode):
    def __init__(self, vc: VirtualCuda) -> None:
        super().__init__()
        self.vc = vc
        self._special: dict[Callable, Callable] = {
            torch.Tensor.to: self._to,
            torch.Tensor.cuda: self._cuda,
            torch.Tensor.cpu: lambda t, *a, **k: self._to(t, "cpu", *a, **k),
            torch.Tensor.tolist: self._tolist,
            torch.Tensor.numpy: self._numpy,
            torch.tensor: self._tensor,
            torch.as_tensor: self._tensor,
            torch.Tensor.new_tensor: self._new_tensor,
            torch.Tensor.requires_grad_: self._requires_grad_,
        }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        special = self._special.get(func)
        if special is not None:
            return special(*args, **kwargs)
        if func in _GUARDED and any(_is_virtual(x) for x in _leaves((args, kwargs))):
            f_args, f_kwargs = _map(_facade, (args, kwargs))
            out = func(*f_args, **f_kwargs)
            if func is torch.Tensor.__setitem__:
                return None
            return _map(_unfacade, out)
        return func(*args, **kwargs)

    def _to(self, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        copy = kwargs.pop("copy", False)
        if args and isinstance(args[0], torch.Tensor):  # to(other): its device and dtype
            other = args[0]
            device, dtype = other.device, other.dtype
            non_blocking = args[1] if len(args) > 1 else kwargs.get("non_blocking", False)
            memory_format = kwargs.get("memory_format", torch.preserve_format)
        else:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        src = t.vdev if _is_virtual(t) else t.device
        dst = self.vc.device(device) or src
        dtype = dtype or t.dtype
        if dst == src and dtype == t.dtype and not copy:
            return t
        if src.type != "cuda" and dst.type != "cuda":
            return torch.Tensor.to(t, dst, dtype, non_blocking, copy, memory_format=memory_format)
        return aten._to_copy.default(
            t,
            dtype=dtype,
            device=dst,
            non_blocking=bool(non_blocking),
            memory_format=memory_format or torch.preserve_format,
        )

    @staticmethod
    def _requires_grad_(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
        if _is_virtual(t):  # autograd on a CUDA device would need CUDA: not emulated
            return t
        return torch.Tensor.requires_grad_(t, requires_grad)

    def _cuda(self, t: torch.Tensor, device: Any = None, non_blocking: bool = False, **kw: Any):
        dev = self.vc.device("cuda" if device is None else device)
        if isinstance(device, int):
            dev = torch.device("cuda", device)
        return self._to(t, dev, non_blocking=non_blocking, **kw)

    def _tolist(self, t: torch.Tensor) -> Any:
        return torch.Tensor.tolist(self._to(t, "cpu") if _is_virtual(t) else t)

    def _numpy(self, t: torch.Tensor, **kwargs: Any) -> Any:
        if _is_virtual(t):
            raise TypeError(
                f"can't convert {t.vdev} device type tensor to numpy. "
                "Use Tensor.cpu() to copy the tensor to host memory first."
            )
        return torch.Tensor.numpy(t, **kwargs)

    def _tensor(self, data: Any, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        dev = self.vc.device(device)
        if isinstance(data, torch.Tensor) or dev is None or dev.type != "cuda":
            if isinstance(data, torch.Tensor) and dev is not None:
                return self._to(torch.as_tensor(data, *args, **kwargs), dev)
            return torch.tensor(data, *args, device=dev, **kwargs)
        host = torch.tensor(data, *args, **kwargs)  # built on the host, then copied over
        return self._to(host, dev)

    def _new_tensor(self, t: torch.Tensor, data: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("dtype", t.dtype)
        kwargs.setdefault("device", t.vdev if _is_virtual(t) else t.device)
        return self._tensor(data, **kwargs)


# ---- CUDA graphs, emulated ----------------------------------------------------------------


def _written_args(func, args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments `func` writes to (per its schema's alias annotations)."""
    out = []
    schema = func._schema
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += [t for t in _leaves(value) if isinstance(t, torch.Tensor)]
    return out


def _fresh_outputs(args: Any, kwargs: Any, out: Any) -> list[int]:
    """Positions (in the flattened output) of outputs in memory no argument holds.

    Told by storage, not by the schema: ops such as `to`, `reshape` or `flatten` are
    annotated as views yet return a copy when they must (and `_unsafe_view` the reverse);
    for the same shapes they decide the same way on every replay."""
    leaves = _leaves((args, kwargs))
    held = {_storage_key(t) for t in leaves if isinstance(t, torch.Tensor)}
    return [
        i
        for i, o in enumerate(_leaves(out))
        if isinstance(o, torch.Tensor) and _storage_key(o) not in held
    ]


def _poison(t: torch.Tensor) -> None:
    """Garbage into a pool tensor: what an unreplayed graph's memory holds."""
    t = _elem(t)  # (memory the graph owns: no device rules to check)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.fill_(math.nan)
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).min)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: EmulatedGraph) -> None:
        super().__init__()
        self.graph = graph
        self.created: set[int] = set()  # storages made during the capture (the pool)
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _HOST_READS or _data_dependent(func):
            raise GraphCaptureError(f"{func} during capture reads the device from the host")
        device = self.graph.device
        if device is not None:
            self._check_device(func, args, kwargs, device)
        for t in _written_args(func, args, kwargs):
            key = _storage_key(t)
            if key not in self.created and key not in self.saved:
                data = _storage_bytes(t)
                self.saved[key] = (data, data.clone())
        out = func(*args, **kwargs)
        fresh = _fresh_outputs(args, kwargs, out)
        flat = _leaves(out)
        for i in fresh:
            self.created.add(_storage_key(flat[i]))
            self.graph.pool.append(flat[i])
        self.graph.ops.append((func, args, kwargs, [flat[i] for i in fresh], fresh))
        return out

    @staticmethod
    def _check_device(func, args, kwargs, device: torch.device) -> None:
        """An op on another CUDA device than the capturing stream's is launched on that
        device's own current stream: CUDA runs it at capture and the graph never holds it."""
        target = kwargs.get("device")
        devices = {x.vdev for x in _leaves((args, kwargs)) if _is_virtual(x)}
        if target is not None and torch.device(target).type == "cuda":
            index = torch.device(target).index
            devices.add(torch.device("cuda", device.index if index is None else index))
        for d in devices - {device}:
            raise GraphCaptureError(
                f"{func} runs on {d} while the graph captures {device}'s stream: CUDA launches "
                f"it on {d}'s current stream, outside the graph (capture under "
                f"torch.cuda.device({d.index}))"
            )


class EmulatedGraph:
    """One call of a step, recorded as aten ops over tensors by identity (see the module).

    `device`: the CUDA device whose stream captures (ops on another device are refused);
    None on the CPU."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.ops: list[tuple[Any, tuple, dict, list[torch.Tensor], list[int]]] = []
        self.pool: list[torch.Tensor] = []
        self.outputs: tuple[torch.Tensor, ...] | None = None
        self._inference = False

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the ops run inside; then memory that existed before is as it was, and the
        graph's own tensors hold garbage."""
        self._inference = torch.is_inference_mode_enabled()
        recorder = _Recorder(self)
        try:
            with recorder:
                yield
        finally:
            for data, saved in recorder.saved.values():
                data.copy_(saved)
        for t in self.pool:
            _poison(t)

    @classmethod
    def capture(cls, step: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> EmulatedGraph:
        """Record `step(*inputs)`; its outputs must be tensors the step computes."""
        graph = cls()
        with graph.recording():
            out = step(*inputs)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        pool = {_storage_key(t) for t in graph.pool}
        for t in outs:
            if _storage_key(t) not in pool:
                raise GraphCaptureError(
                    "a step output is memory that existed before capture (an input or state): "
                    "return a tensor the step computes"
                )
        graph.outputs = outs
        return graph

    def replay(self) -> None:
        """Re-run the recorded ops on the recorded tensors."""
        with torch.inference_mode(self._inference):
            for func, args, kwargs, targets, fresh in self.ops:
                out = func(*args, **kwargs)
                flat = _leaves(out)
                for target, i in zip(targets, fresh, strict=True):
                    _elem(target).copy_(_elem(flat[i]))  # same device by construction

    def invalidate(self) -> None:
        """Another graph of the same pool ran: this one's outputs (all its tensors when
        they are not known) hold garbage."""
        with torch.inference_mode(self._inference):
            for t in self.pool if self.outputs is None else self.outputs:
                _poison(t)


class EmulatedBucketGraphs:
    """`services/common/cuda_graphs.BucketGraphs` emulated on CPU (same interface: the step
    takes the key's static shape first): capture warms the step up `warmup_iters` times for
    real, then records it; run copies the inputs into the static buffers and replays. All
    graphs share one pool: running one invalidates the outputs of the others. With `strict`
    (a `VirtualCuda`), recording and replay run in its `strict()` region, as a CUDA capture
    refuses host syncs."""

    def __init__(
        self,
        step: Callable[..., Any],
        device: Any = None,
        warmup_iters: int = 2,
        strict: VirtualCuda | None = None,
    ) -> None:
        self.step = step
        self.device = device
        self.warmup_iters = warmup_iters
        self.strict = strict
        self._graphs: dict[Any, tuple[EmulatedGraph, tuple[torch.Tensor, ...]]] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self._graphs

    def _in_graph(self) -> contextlib.AbstractContextManager:
        return self.strict.strict() if self.strict is not None else contextlib.nullcontext()

    def _static(self, example: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        device = self.device
        return tuple((t if device is None else t.to(device)).clone() for t in example)

    def capture(self, key: Any, shape: Any, example: Sequence[torch.Tensor]) -> None:
        static_in = self._static(example)
        step = functools.partial(self.step, shape)
        for _ in range(self.warmup_iters):
            step(*static_in)
        with self._in_graph():
            self._graphs[key] = (EmulatedGraph.capture(step, static_in), static_in)

    def run(self, key: Any, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        graph, static_in = self._graphs[key]
        for buf, x in zip(static_in, inputs, strict=True):
            buf.copy_(x)
        for other, _ in self._graphs.values():
            if other is not graph:
                other.invalidate()
        with self._in_graph():
            graph.replay()
        return graph.outputs


class EagerBucketGraphs(EmulatedBucketGraphs):
    """The same protocol run eagerly (the twin a replay is compared with): capture only
    warms up; run steps on the static buffers."""

    def capture(self, key: Any, shape: Any, example: Sequence[torch.Tensor]) -> None:
        static_in = self._static(example)
        for _ in range(self.warmup_iters):
            self.step(shape, *static_in)
        self._graphs[key] = ((shape,), static_in)  # type: ignore[assignment]

    def run(self, key: Any, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        (shape,), static_in = self._graphs[key]
        for buf, x in zip(static_in, inputs, strict=True):
            buf.copy_(x)
        out = self.step(shape, *static_in)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)
