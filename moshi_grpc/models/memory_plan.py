"""Device memory of an LM and a codec replica, from their configs: no weights, no device.

Why: a 7B LM at float32 with 16 slots needs ~75 GiB and dies at load on an 80 GB card; the
engine should refuse such a configuration with a clear message before it allocates, and an
operator should know how many sessions a card holds before renting one. Every figure here
is computed from the config (`LMConfig`, `MimiConfig`) and the dtypes:

- closed-form arithmetic for the LM (weights, ring KV cache, depformer scratch, generator
  state): cheap enough to call before loading anything (`lm_memory`, `check_lm_fits`);
- meta tensors (shapes, no storage) where the arithmetic would repeat a model's structure:
  the Mimi streaming state, and the temporaries of one step (`step_temporaries`: the peak
  bytes of tensors alive at once while a step runs on meta tensors). A captured CUDA graph
  keeps its step's temporaries in a private pool, so they estimate the graph pools.

The figures are lower bounds of what the caching allocator reserves (it rounds blocks up,
and cuBLAS/cuDNN keep workspaces), so a plan keeps a fixed `reserve` for those and for the
CUDA context. `moshi-grpc bench gpu` measures the same quantities on a card to check them.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moshi_grpc.models.lm import LMConfig

__all__ = [
    "CodecMemory",
    "LmMemory",
    "MemoryPlan",
    "MemoryPlanError",
    "check_lm_fits",
    "codec_memory",
    "lm_memory",
    "parse_size",
    "plan_sessions",
    "step_temporaries",
]

GiB = 2**30
MiB = 2**20
# CUDA context (~0.5 GiB on Hopper), cuBLAS/cuDNN workspaces and allocator rounding: what
# `torch.cuda.memory_allocated` never shows but the card does not have for tensors.
DEFAULT_RESERVE = 2 * GiB
# A captured bucket keeps its step's temporaries in the graphs' private pool; the buckets
# of a ladder (1, 2, 4, ...) are captured one after the other into the same pool, whose
# blocks a larger capture can only partly reuse (up to 2x the largest bucket's), and the
# eager warm-up before each capture leaves its blocks cached in the general pool (1x).
GRAPH_POOL_FACTOR = 3


class MemoryPlanError(ValueError):
    """A configuration cannot fit the device memory it is given (or the request is invalid)."""


_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes of a size like `80GiB`, `141 GB`, `81559MiB` or `1234` (GB = 10^9, GiB = 2^30:
    cards are sold in GB, `nvidia-smi` reports MiB)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise MemoryPlanError(
            f"cannot read the size {text!r}: a number and a unit, e.g. 80GiB, 141GB, 81559MiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# --------------------------------------------------------------------------------------------
# The LM: closed-form arithmetic
# --------------------------------------------------------------------------------------------


def lm_parameter_count(cfg: LMConfig) -> int:
    """Parameters of `LMModel(cfg)`, counted from the config (tests check it against the
    module built on the meta device, for every preset)."""
    d, h = cfg.dim, cfg.hidden
    dd, dh, q = cfg.depformer_dim, cfg.depformer_hidden, cfg.dep_q
    temporal_layer = 4 * d * d + 3 * d * h + 2 * d  # fused qkv + out, gated FFN, 2 norms
    depformer_layer = q * (4 * dd * dd + 3 * dd * dh) + 2 * dd  # weights per codebook step
    return (
        cfg.n_q * (cfg.card + 1) * d  # audio embeddings (+1: the initial token)
        + (cfg.text_card + 1) * d  # text embedding
        + cfg.num_layers * temporal_layer
        + d  # out_norm
        + cfg.text_card * d  # text_linear
        + q * d * dd  # depformer_in
        + (q - 1) * (cfg.card + 1) * dd  # depformer_emb
        + (cfg.text_card + 1) * dd  # depformer_text_emb
        + cfg.depformer_num_layers * depformer_layer
        + q * dd * cfg.card  # linears
    )


@dataclass(frozen=True)
class LmMemory:
    """Bytes of an LM replica: its weights, and what each row (session) adds."""

    weights: int
    kv_per_row: int  # temporal ring KV cache at full context, every layer
    depformer_per_row: int  # depformer key/value scratch
    state_per_row: int  # token ring, step counter, sampling parameters, seeds
    context: int

    @property
    def per_row(self) -> int:
        return self.kv_per_row + self.depformer_per_row + self.state_per_row

    def total(self, rows: int, temporaries: int = 0) -> int:
        """Weights + `rows` rows + `temporaries` (graph pools; see `step_temporaries`)."""
        return self.weights + rows * self.per_row + temporaries


def lm_memory(
    cfg: LMConfig,
    dtype: torch.dtype,
    kv_dtypes: tuple[torch.dtype, torch.dtype] | None = None,
) -> LmMemory:
    """The LM's bytes on its device for weights in `dtype` and a KV cache of `kv_dtypes`
    (keys, values; default: the weights' dtype, as on CUDA)."""
    size = _itemsize(dtype)
    kd, vd = kv_dtypes or (dtype, dtype)
    head_dim = cfg.dim // cfg.num_heads
    kv = cfg.num_layers * cfg.num_heads * cfg.context * head_dim * (_itemsize(kd) + _itemsize(vd))
    dep_hd = cfg.depformer_dim // cfg.depformer_num_heads
    dep = cfg.depformer_num_layers * 2 * cfg.depformer_num_heads * cfg.dep_q * dep_hd * size
    # LMGen: tokens [K, max_delay + 2] int64; counter, cache row id, generator row id, two
    # seed halves (int64 each); temperature [2] float32; top_k [2] int64; a prompt's fixed
    # tokens (a bool and an int64 per generated stream); the lagged user codes (int64 each)
    ring = cfg.max_delay + 2
    generated = cfg.dep_q + 1
    state = cfg.num_codebooks * ring * 8 + 5 * 8 + 2 * 4 + 2 * 8
    state += generated * (1 + 8) + cfg.num_user_streams * 8
    return LmMemory(lm_parameter_count(cfg) * size, kv, dep, state, cfg.context)


def check_lm_fits(
    cfg: LMConfig,
    dtype: torch.dtype,
    rows: int,
    free_bytes: int,
    *,
    kv_dtypes: tuple[torch.dtype, torch.dtype] | None = None,
    reserve: int = DEFAULT_RESERVE,
    what: str = "the device",
) -> LmMemory:
    """Raise `MemoryPlanError` when weights + `rows` rows + `reserve` exceed `free_bytes`
    (call it before allocating: a load that cannot fit fails in seconds with the figures
    instead of minutes later with an out-of-memory error). Returns the memory figures."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise MemoryPlanError(f"rows must be a positive integer, got {rows!r}")
    mem = lm_memory(cfg, dtype, kv_dtypes)
    need = mem.total(rows) + reserve
    if need > free_bytes:
        fit = max(0, (free_bytes - reserve - mem.weights) // mem.per_row)
        dt = str(dtype).removeprefix("torch.")
        hint = f"at most {fit} sessions fit" if fit else "not even one session fits"
        raise MemoryPlanError(
            f"the LM does not fit {what}: {dt} weights {mem.weights / GiB:.1f} GiB + {rows} "
            f"sessions x {mem.per_row / GiB:.3f} GiB (KV cache at context {mem.context}) + "
            f"{reserve / GiB:.1f} GiB reserve = {need / GiB:.1f} GiB > {free_bytes / GiB:.1f} "
            f"GiB free; {hint} (fewer --max-sessions, or a smaller dtype such as bfloat16)"
        )
    return mem


# --------------------------------------------------------------------------------------------
# Meta tensors: temporaries of a step, the codec's state
# --------------------------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created under the mode while any tensor holds them:
    `peak` is the most alive at once. Storages that existed before (weights, state
    tensors, their views, in-place writes into them) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: dict[int, list[int]] = {}  # storage -> [bytes, tensors holding it]

    def _release(self, key: int) -> None:
        held = self._held.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            self.live -= held[0]
            del self._held[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        older = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            held = self._held.get(key)
            if held is None:
                if key in older:  # a view of, or a write into, memory made before
                    continue
                held = self._held[key] = [t.untyped_storage().nbytes(), 0]
                self.live += held[0]
                self.peak = max(self.peak, self.live)
            held[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def step_temporaries(step: Callable[[], object]) -> tuple[int, int]:
    """(peak, kept): bytes of the tensors `step()` creates, the most alive at once and those
    still alive after it (its outputs and anything it stored). Run it on meta tensors (no
    memory, no compute: a 7B step traces in about a second) or on real ones."""
    with torch.inference_mode(), _LiveBytes() as live:
        out = step()
        kept = live.live
    del out
    return live.peak, kept


def meta_lm(cfg: LMConfig, dtype: torch.dtype):
    """`LMModel(cfg)` with meta tensors (shapes only) in `dtype`."""
    from moshi_grpc.models.lm import LMModel

    with torch.device("meta"):
        model = LMModel(cfg, "meta")
    return model.to(dtype).eval().requires_grad_(False)


def lm_step_temporaries(lm, rows: int) -> int:
    """Peak temporaries of one captured LM step of `rows` rows (`LMGen.full_shape`: full
    context, sampling over every candidate), traced on `lm` (a meta model: `meta_lm`)."""
    from moshi_grpc.models.lm_gen import LMGen

    gen = LMGen(lm, rows)  # no resets: a captured step's work does not depend on them
    cfg, dev = lm.config, lm.device
    inputs = (
        torch.zeros((rows, cfg.num_user_streams), dtype=torch.long, device=dev),
        torch.ones(rows, dtype=torch.bool, device=dev),
        torch.zeros(rows, dtype=torch.bool, device=dev),
        torch.zeros(rows, dtype=torch.long, device=dev),
        torch.zeros((rows, cfg.dep_q), dtype=torch.long, device=dev),
    )
    shape = gen.full_shape()
    return step_temporaries(lambda: gen.core(*inputs, shape=shape))[0]


@dataclass(frozen=True)
class CodecMemory:
    """Bytes of a Mimi replica (an encoder and a decoder streamer over the same rows)."""

    weights: int  # parameters and codebooks
    state_per_row: int  # conv states (and their fresh copies), KV rings, positions

    def total(self, rows: int, temporaries: int = 0) -> int:
        return self.weights + rows * self.state_per_row + temporaries


def meta_mimi(config="mimi", dtype: torch.dtype = torch.float32, num_codebooks: int = 8):
    """`Mimi` with meta tensors in `dtype`, codebooks in float32 (as `load_mimi` keeps them)."""
    from moshi_grpc.models.mimi import PRESETS, Mimi, MimiConfig

    if not isinstance(config, MimiConfig) and config not in PRESETS:
        raise MemoryPlanError(f"unknown Mimi config {config!r}; presets: {sorted(PRESETS)}")
    with torch.device("meta"):
        mimi = Mimi(config if isinstance(config, MimiConfig) else PRESETS[config], num_codebooks)
    mimi = mimi.to(dtype).eval().requires_grad_(False)
    for name, buf in list(mimi.named_buffers()):
        if "._codebook." in name:
            owner, attr = name.rsplit(".", 1)
            setattr(mimi.get_submodule(owner), attr, buf.float())
    return mimi


def codec_memory(mimi) -> CodecMemory:
    """Weights and per-row streaming state of `mimi` (a meta model: `meta_mimi`)."""
    weights = sum(t.numel() * t.element_size() for t in (*mimi.parameters(), *mimi.buffers()))
    _, one = step_temporaries(lambda: (mimi.streaming_encoder(1), mimi.streaming_decoder(1)))
    _, two = step_temporaries(lambda: (mimi.streaming_encoder(2), mimi.streaming_decoder(2)))
    return CodecMemory(weights, two - one)


def codec_step_temporaries(mimi, rows: int) -> tuple[int, int]:
    """Peak temporaries of one encoder and one decoder step of `rows` rows (masked: the
    larger of the two captured variants), traced on `mimi` (a meta model)."""
    dev = mimi.device
    enc, dec = mimi.streaming_encoder(rows), mimi.streaming_decoder(rows)
    active = torch.ones(rows, dtype=torch.bool, device=dev)
    pcm = torch.zeros((rows, mimi.frame_size), dtype=mimi.dtype, device=dev)
    codes = torch.zeros((rows, mimi.num_codebooks), dtype=torch.long, device=dev)
    e = step_temporaries(lambda: enc.step_unchecked(pcm, active))[0]
    d = step_temporaries(lambda: dec.step_unchecked(codes, active))[0]
    return e, d


# --------------------------------------------------------------------------------------------
# A plan: how many sessions a card holds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Sessions that fit `gpu_bytes` with the LM (and the codec, if any) on one card."""

    gpu_bytes: int
    reserve: int
    lm: LmMemory
    codec: CodecMemory | None
    sessions: int  # the most that fit (0: not even one)
    pools: dict[str, int]  # graph pools + warm-up cache at `sessions` rows, estimated

    @property
    def per_session(self) -> int:
        return self.lm.per_row + (self.codec.state_per_row if self.codec else 0)

    @property
    def fixed(self) -> int:
        return self.lm.weights + (self.codec.weights if self.codec else 0) + self.reserve

    def used(self) -> int:
        return self.fixed + self.sessions * self.per_session + sum(self.pools.values())


def plan_sessions(
    gpu_bytes: int,
    lm: LmMemory,
    codec: CodecMemory | None = None,
    *,
    pools: Callable[[int], dict[str, int]] | None = None,
    reserve: int = DEFAULT_RESERVE,
) -> MemoryPlan:
    """The most sessions whose weights, per-session state, graph pools (`pools(rows)`, bytes
    per pool at that many rows, already scaled) and `reserve` fit `gpu_bytes`. The pools
    are assumed to grow with the rows."""
    per = lm.per_row + (codec.state_per_row if codec else 0)
    fixed = lm.weights + (codec.weights if codec else 0) + reserve
    pools = pools or (lambda rows: {})

    def fits(n: int) -> dict[str, int] | None:
        held = pools(n)
        return held if fixed + n * per + sum(held.values()) <= gpu_bytes else None

    n = max(0, (gpu_bytes - fixed) // per)  # no pools: an upper bound
    above = n + 1  # the fewest sessions known not to fit
    held = fits(n) if n else {}
    while held is None:  # step down at the rate the pools add per session
        above = n
        rate = per + sum(pools(n).values()) / n
        n = max(0, min(n - 1, int((gpu_bytes - fixed) // rate)))
        held = fits(n) if n else {}
    while above - n > 1:  # then up again, to the most that fit
        mid = (n + above) // 2
        more = fits(mid)
        if more is None:
            above = mid
        else:
            n, held = mid, more
    return MemoryPlan(gpu_bytes, reserve, lm, codec, n, held)


TRACED_ROWS = 256  # above this many rows the pools are extrapolated from 128 and 256


def graph_pools(lm_meta, mimi_meta=None) -> Callable[[int], dict[str, int]]:
    """`pools(rows)` for `plan_sessions`: each replica's graph pool and warm-up cache,
    estimated as `GRAPH_POOL_FACTOR` x the traced temporaries of its largest bucket
    (traced once per row count; linear beyond `TRACED_ROWS`, where a trace would spend
    seconds making per-row views)."""
    traced: dict[int, dict[str, int]] = {}

    def trace(rows: int) -> dict[str, int]:
        if rows not in traced:
            out = {"LM step": lm_step_temporaries(lm_meta, rows)}
            if mimi_meta is not None:
                out["codec encode"], out["codec decode"] = codec_step_temporaries(mimi_meta, rows)
            traced[rows] = out
        return traced[rows]

    def pools(rows: int) -> dict[str, int]:
        if rows <= TRACED_ROWS:
            peaks = trace(rows)
        else:
            top, half = trace(TRACED_ROWS), trace(TRACED_ROWS // 2)
            per_row = {k: (top[k] - half[k]) / (TRACED_ROWS // 2) for k in top}
            peaks = {k: int(top[k] + (rows - TRACED_ROWS) * per_row[k]) for k in top}
        return {k: GRAPH_POOL_FACTOR * v for k, v in peaks.items()}

    return pools


def format_plan(plan: MemoryPlan, title: str) -> str:
    """The plan as a markdown table (bytes in GiB or MiB), marked as a plan."""

    def gib(n: float) -> str:
        if n >= GiB / 4:
            return f"{n / GiB:.3f} GiB"
        return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"

    lm, codec, n = plan.lm, plan.codec, plan.sessions
    rows = [
        ("LM weights", "once", lm.weights),
        (f"LM KV cache (context {lm.context})", "per session", lm.kv_per_row),
        ("LM depformer scratch", "per session", lm.depformer_per_row),
        ("LM generator state", "per session", lm.state_per_row),
    ]
    if codec is not None:
        rows += [
            ("Mimi weights + codebooks", "once", codec.weights),
            ("Mimi state (encoder + decoder)", "per session", codec.state_per_row),
        ]
    rows += [
        (f"graph pools + warm-up cache: {name} (est.)", f"at {n} sessions", size)
        for name, size in plan.pools.items()
    ]
    rows += [
        ("reserve: CUDA context, workspaces, rounding", "once", plan.reserve),
        (f"total at {n} sessions", "", plan.used()),
        ("GPU memory", "", plan.gpu_bytes),
    ]
    lines = [
        f"**{title}** (a plan: arithmetic from the configs, not a measurement)",
        "",
        "| item | per | size |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {per} | {gib(size)} |" for name, per, size in rows]
    lines += ["", f"Sessions that fit: **{n}** ({gib(plan.per_session)} per session)."]
    return "\n".join(lines)
