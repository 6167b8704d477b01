"""The Moshi language model: Helium temporal transformer + depth transformer ("depformer").

Read top to bottom, gpt-fast style: a config dataclass parsed from kyutai's official
`config.json` keys, plain modules whose state-dict names *are* the official checkpoint names
(`transformer.layers.0.self_attn.in_proj_weight`, ...), and an explicit ring KV cache module
with preallocated per-slot buffers. Streaming state (step counters, token buffers, sampling)
lives in `lm_gen.LMGen`; this file only knows how to run one step for a set of cache rows.

Per step and per session the model sees 1 + n_q tokens (text, Moshi's dep_q audio streams, the
user's n_q - dep_q audio streams), sums their embeddings, runs the temporal transformer (RoPE,
RMSNorm, SiLU-gated FFN, causal attention over at most `context` past steps), predicts the text
token, then runs the depformer dep_q times (one set of weights per codebook, no positions,
attention over the codebooks of the same step) to predict Moshi's audio codes one by one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moshi_grpc.models.checkpoint import CheckpointError, load_state_strict, read_safetensors
from moshi_grpc.models.rope import rope_angles, rotate

logger = logging.getLogger(__name__)

__all__ = ["LMConfig", "LMModel", "RingKVCache", "LMConfigError", "load_lm", "PRESETS"]


class LMConfigError(ValueError):
    """The LM configuration is malformed, incomplete or asks for an unsupported variant."""


# --------------------------------------------------------------------------------------------
# Configuration (official kyutai config.json keys)
# --------------------------------------------------------------------------------------------

# Keys of a kyutai config.json that describe files or tooling, not the network: accepted and
# kept in `LMConfig.extra` so a real config.json loads as is.
_METADATA_KEYS = {
    "moshi_name",
    "mimi_name",
    "mimi_config_name",
    "tokenizer_name",
    "lora_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "stt_config",
    "model_id",
    "depformer_causal",  # deprecated upstream, ignored there too
}

# Keys the reference accepts whose only supported value here is the neutral one.
_NEUTRAL_KEYS: dict[str, Any] = {
    "text_card_out": None,
    "demux_second_stream": False,
    "demux_second_text_stream": False,
    "norm_emb": False,
    "bias_proj": False,
    "depformer_norm": None,
    "depformer_weights_per_step_schedule": None,
    "depformer_low_rank_embeddings": None,
    "extra_heads_num_heads": 0,
    "extra_heads_dim": 6,
    "kv_repeat": 1,
    "depformer_kv_repeat": 1,
    "conditioners": None,
    "fuser": None,
    "cross_attention": False,
    "lora": False,
    "quantize": False,
}


@dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of the Moshi LM, named exactly like kyutai's config.json keys."""

    dim: int
    text_card: int
    existing_text_padding_id: int
    n_q: int
    dep_q: int
    card: int
    num_heads: int
    num_layers: int
    hidden_scale: float
    causal: bool
    layer_scale: float | None
    context: int
    max_period: float
    gating: str
    norm: str
    positional_embedding: str
    depformer_dim: int
    depformer_dim_feedforward: int | None
    depformer_num_heads: int
    depformer_num_layers: int
    depformer_layer_scale: float | None
    depformer_multi_linear: bool
    depformer_context: int
    depformer_max_period: float
    depformer_gating: str
    depformer_pos_emb: str
    depformer_weights_per_step: bool
    delays: list[int]
    existing_text_end_padding_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_codebooks(self) -> int:
        """Streams per step: text + n_q audio streams."""
        return self.n_q + 1

    @property
    def num_user_streams(self) -> int:
        return self.n_q - self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def hidden(self) -> int:
        return _gating_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden(self) -> int:
        ff = self.depformer_dim_feedforward
        if ff is None:
            ff = int(self.hidden_scale * self.depformer_dim)
        return _gating_hidden(self.depformer_dim, ff)

    @property
    def norm_eps(self) -> float:
        return 1e-8 if self.norm == "rms_norm_f32" else 1e-5

    # ---- parsing -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LMConfig:
        """Parse an official config.json dict; unknown or missing keys raise LMConfigError."""
        if not isinstance(raw, dict):
            raise LMConfigError(f"LM config must be a JSON object, got {type(raw).__name__}")
        names = {f.name for f in fields(cls)} - {"extra"}
        optional = {"existing_text_end_padding_id"}
        unknown = sorted(set(raw) - names - _METADATA_KEYS - set(_NEUTRAL_KEYS))
        missing = sorted(names - optional - set(raw))
        problems = []
        if unknown:
            problems.append(f"unknown keys: {', '.join(unknown)}")
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if problems:
            raise LMConfigError("invalid LM config; " + "; ".join(problems))
        for key, neutral in _NEUTRAL_KEYS.items():
            if key == "extra_heads_dim":  # meaningless without extra heads
                continue
            if key in raw and raw[key] != neutral and raw[key] not in (None, [], {}):
                raise LMConfigError(f"unsupported LM config value {key}={raw[key]!r}")
        kwargs = {k: raw[k] for k in names if k in raw}
        kwargs["delays"] = list(kwargs["delays"])
        extra = {k: raw[k] for k in raw if k in _METADATA_KEYS}
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The official config.json form (metadata keys included)."""
        out = asdict(self)
        extra = out.pop("extra")
        out.update(extra)
        return out

    def validate(self) -> None:
        """Reject values this implementation does not run (rather than run them wrongly)."""
        fixed = {
            "causal": (self.causal, True),
            "layer_scale": (self.layer_scale, None),
            "depformer_layer_scale": (self.depformer_layer_scale, None),
            "gating": (self.gating, "silu"),
            "depformer_gating": (self.depformer_gating, "silu"),
            "positional_embedding": (self.positional_embedding, "rope"),
            "depformer_pos_emb": (self.depformer_pos_emb, "none"),
            "depformer_multi_linear": (self.depformer_multi_linear, True),
            "depformer_weights_per_step": (self.depformer_weights_per_step, True),
        }
        for key, (value, want) in fixed.items():
            if value != want:
                raise LMConfigError(f"unsupported LM config value {key}={value!r} (need {want!r})")
        if self.norm not in ("rms_norm_f32", "rms_norm"):
            raise LMConfigError(f"unsupported norm {self.norm!r} (rms_norm_f32 or rms_norm)")
        ints = {
            "dim": self.dim,
            "text_card": self.text_card,
            "n_q": self.n_q,
            "dep_q": self.dep_q,
            "card": self.card,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "context": self.context,
            "depformer_dim": self.depformer_dim,
            "depformer_num_heads": self.depformer_num_heads,
            "depformer_num_layers": self.depformer_num_layers,
        }
        for key, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LMConfigError(f"LM config {key} must be a positive integer, got {value!r}")
        if self.dep_q > self.n_q:
            raise LMConfigError(f"dep_q ({self.dep_q}) cannot exceed n_q ({self.n_q})")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise LMConfigError("dim must split into num_heads heads of even size")
        if self.depformer_dim % self.depformer_num_heads:
            raise LMConfigError("depformer_dim must be divisible by depformer_num_heads")
        if len(self.delays) != self.num_codebooks or any(
            not isinstance(d, int) or d < 0 for d in self.delays
        ):
            raise LMConfigError(
                f"delays must be {self.num_codebooks} non-negative integers, got {self.delays!r}"
            )
        for key in ("existing_text_padding_id", "existing_text_end_padding_id"):
            value = getattr(self, key)
            if not isinstance(value, int) or not 0 <= value < self.text_card:
                raise LMConfigError(f"{key} must be a text token id, got {value!r}")


def _gating_hidden(dim: int, dim_feedforward: int) -> int:
    """Hidden width of the SiLU-gated FFN, as the published checkpoints define it."""
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


# Published moshiko/moshika config (kyutai/moshiko-pytorch-bf16 config.json, LM keys).
_MOSHIKO_7B: dict[str, Any] = {
    "dim": 4096,
    "text_card": 32000,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 2048,
    "num_heads": 32,
    "num_layers": 32,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 3000,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_dim_feedforward": 4224,
    "depformer_num_heads": 16,
    "depformer_num_layers": 6,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


def _derive(**changes: Any) -> dict[str, Any]:
    out = dict(_MOSHIKO_7B)
    out.update(changes)
    return out


PRESETS: dict[str, dict[str, Any]] = {
    "moshiko-7b": _MOSHIKO_7B,
    # Mid-size model for the CPU benchmark: real vocabularies and stream layout.
    "mid": _derive(
        dim=1024,
        num_heads=8,
        num_layers=12,
        depformer_dim=512,
        depformer_num_heads=8,
        depformer_num_layers=4,
        depformer_dim_feedforward=int(4.125 * 512),
    ),
    # CPU demo: real vocab layout (32000 text / 2048 audio, 8+8 streams), tiny dims.
    "small": _derive(
        dim=128,
        num_heads=4,
        num_layers=2,
        depformer_dim=64,
        depformer_num_heads=2,
        depformer_num_layers=1,
        depformer_dim_feedforward=int(4.125 * 64),
    ),
    # Unit tests: tiny vocabularies too.
    "tiny": _derive(
        dim=64,
        num_heads=4,
        num_layers=2,
        text_card=200,
        card=64,
        context=16,
        depformer_dim=32,
        depformer_num_heads=2,
        depformer_num_layers=2,
        depformer_dim_feedforward=int(4.125 * 32),
    ),
}


def resolve_config(config: str | Path | dict | LMConfig) -> tuple[LMConfig, str]:
    """An LMConfig and a display name from a preset name, a config.json path, or a dict."""
    if isinstance(config, LMConfig):
        return config, "custom"
    if isinstance(config, dict):
        return LMConfig.from_dict(config), "custom"
    if isinstance(config, str) and config in PRESETS:
        return LMConfig.from_dict(PRESETS[config]), config
    path = Path(config)
    if not path.is_file():
        raise LMConfigError(
            f"LM config {str(config)!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LMConfigError(f"cannot read LM config {path}: {exc}") from exc
    return LMConfig.from_dict(raw), path.stem if path.stem != "config" else path.parent.name


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _can_pack(w: torch.Tensor) -> bool:
    return (
        w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


def pack_weight(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a `[out, in]` weight for `linear`, or None where unsupported.

    On CPU a matrix-vector product against the packed layout runs ~1.3x (float32, batch 1)
    to ~2x (float32 batch 8, bfloat16 batch 1) faster than `F.linear` on the plain tensor,
    for the same result up to float rounding. It costs one more copy of the weights.
    """
    if not _can_pack(w):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 1)
    except (RuntimeError, AttributeError):  # build without the op: plain F.linear
        return None


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    packed: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """`x @ w[rows].T`, plus `residual` if given, through the packed weight when there is one
    (`packed` is then the packed `w[rows]`, and the slice is never taken).

    With a packed weight the residual add is a oneDNN post-op of the matmul: one dispatched
    op fewer per layer (the depformer runs dep_q x layers of them per step), and in bfloat16
    one rounding fewer. In float32 the sum is the same as `residual + x @ w.T`.
    """
    if packed is None or (_gemv.active and x.numel() == x.shape[-1]):
        y = F.linear(x, w if rows is None else w[rows])
        return y if residual is None else residual + y
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if residual is None:
        y = torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")
    else:
        r2 = residual if residual.dim() == 2 else residual.reshape(-1, residual.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise.binary(x2, r2, packed, None, "add")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class _GemvState(threading.local):
    active = False  # this thread is inside `half_gemv()`


_gemv = _GemvState()
_gemv_lock = threading.Lock()
_gemv_users = 0
_gemv_saved_mkldnn = True


@contextlib.contextmanager
def half_gemv(enable: bool = True) -> Iterator[None]:
    """Run single-row half-precision matmuls through PyTorch's own matrix-vector kernel.

    For one row (batch 1), PyTorch's reduced-precision GEMV (float32 accumulation) reads
    bfloat16 weights at ~30 GB/s with 2 threads on this project's CPU (AVX-512 BF16, no AMX),
    where oneDNN's bfloat16 kernel, even on pre-packed weights, reaches ~20 GB/s. ATen only
    takes that kernel while oneDNN matmul is switched off, and that switch is process-wide:
    while any thread is inside this context it is off (ref-counted; restored when the last
    one leaves), and `linear` uses the plain weights for single rows in the threads inside
    it. Other threads of the process meanwhile run their half-precision matmuls and their
    convolutions (any dtype) without oneDNN: slower, same results up to rounding (float32
    matmuls go to MKL either way). The services run the LM in its own process; `LMGen`
    enables this only for batch-1 steps of a bfloat16/float16 model on CPU
    (`LMGen.half_gemv = False` turns it off).
    """
    global _gemv_users, _gemv_saved_mkldnn
    if not enable or _gemv.active:
        yield
        return
    with _gemv_lock:
        if _gemv_users == 0:
            _gemv_saved_mkldnn = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _gemv_users += 1
    _gemv.active = True
    try:
        yield
    finally:
        _gemv.active = False
        with _gemv_lock:
            _gemv_users -= 1
            if _gemv_users == 0:
                torch._C._set_mkldnn_enabled(_gemv_saved_mkldnn)


class RMSNorm(nn.Module):
    """RMSNorm with the checkpoint's `alpha[1, 1, dim]`; statistics in float32 if asked."""

    def __init__(self, dim: int, eps: float, f32: bool) -> None:
        super().__init__()
        self.eps = eps
        self.f32 = f32
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))
        self._alpha: torch.Tensor | None = None  # `[dim]`, in the statistics dtype

    def refresh(self) -> None:
        """Cache alpha as `[dim]` in the statistics dtype (a bf16 model would otherwise
        convert it at every call)."""
        a = self.alpha.detach().view(-1)
        self._alpha = a.float() if self.f32 else a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `x [..., dim]` (any number of leading dimensions)."""
        xf = x.float() if self.f32 else x
        alpha = self._alpha
        if alpha is None or alpha.device != x.device or alpha.dtype != xf.dtype:
            alpha = self.alpha.view(-1).to(xf.dtype)
        var = self.eps + torch.mean(xf * xf, dim=-1, keepdim=True)
        return (xf * (alpha * torch.rsqrt(var))).to(x.dtype)


class Gating(nn.Module):
    """SiLU-gated FFN: linear_in -> [a, b] -> silu(a) * b -> linear_out."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)
        self.packed: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def pack(self, enable: bool) -> None:
        w_in, w_out = self.linear_in.weight, self.linear_out.weight
        self.packed = (pack_weight(w_in), pack_weight(w_out)) if enable else (None, None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN of `x`, plus `residual` if given."""
        h = linear(x, self.linear_in.weight, self.packed[0])  # (B, T, 2 * hidden)
        h = h.view(*h.shape[:-1], 2, -1)
        gated = F.silu(h[..., 0, :]) * h[..., 1, :]
        return linear(gated, self.linear_out.weight, self.packed[1], residual)


def kv_cache_dtypes(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """Storage dtypes (keys, values) of the temporal KV cache for a model of `dtype` on `device`.

    Elsewhere than on CPU, and for float32 models, both are the model's dtype. On CPU a
    bfloat16 (or float16) model attends in full precision: oneDNN's bfloat16 matmul with one
    query column runs at a third of its float32 speed per byte here (it wastes 15 of 16
    vector lanes), so keys are kept in float32 (same speed as any half type for the
    query-key products, whose rows are only head_dim long) and values in float16, which
    PyTorch's reduced-precision matrix-vector kernel reads at full bandwidth with float32
    accumulation (twice as fast as float32; float16 keeps 3 more mantissa bits than
    bfloat16, and the values are projections of normalised activations, far from its range
    limit). The cost is 1.5x the memory of a bfloat16 cache (mid config: 221 MB per slot at
    3000 steps).
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32, torch.float16
    return dtype, dtype


class RingKVCache(nn.Module):
    """Keys `k [slots, heads, capacity, head_dim]` and values `v_t [slots, heads, head_dim,
    capacity]` of one attention layer, preallocated.

    Step `p` of a slot is stored at ring index `p % capacity`; keys are rotated before they
    are stored, so the order inside the ring does not matter to attention. Row `i` holds
    `min(steps_i, capacity)` valid entries; attention reads only the filled prefix. Values are
    kept transposed so that both attention products are plain matrix-vector products over
    contiguous rows (about 3x faster on CPU than the transposed forms for one query).
    """

    def __init__(
        self,
        slots: int,
        heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        value_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.capacity = capacity
        value_dtype = value_dtype or dtype
        k = torch.zeros(slots, heads, capacity, head_dim, dtype=dtype, device=device)
        v_t = torch.zeros(slots, heads, head_dim, capacity, dtype=value_dtype, device=device)
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v_t", v_t, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def write(
        self,
        rows: torch.Tensor,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        active: torch.Tensor | None = None,
    ):
        """Store `k, v [B, H, D]` at ring `index[B]` of cache `rows[B]`; rows where `active`
        is False keep their entry (a masked row's cache stays bit for bit as it was)."""
        k, v = k.to(self.k.dtype), v.to(self.v_t.dtype)
        if active is not None:
            keep = ~active[:, None, None]
            k = torch.where(keep, self.k[rows, :, index], k)
            v = torch.where(keep, self.v_t[rows, :, :, index], v)
        self.k[rows, :, index] = k
        self.v_t[rows, :, :, index] = v

    def read(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` ring entries of rows `[0, batch)` as views (no copy): keys
        `[B, H, length, D]`, transposed values `[B, H, D, length]`."""
        return self.k[:batch, :, :length], self.v_t[:batch, ..., :length]

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (a session's whole cache) into row `dst`."""
        self.k[dst].copy_(self.k[src])
        self.v_t[dst].copy_(self.v_t[src])


def attend_ring(
    q: torch.Tensor, keys: torch.Tensor, values_t: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One query step `q [B, H, 1, D]` over ring keys `[B, H, L, D]` / values `[B, H, D, L]`."""
    scores = torch.matmul(keys, q.transpose(-1, -2)).transpose(-1, -2)  # (B, H, 1, L)
    weights = _softmax_f32(scores * (q.shape[-1] ** -0.5), mask).to(values_t.dtype)
    out = torch.matmul(values_t, weights.transpose(-1, -2))  # (B, H, D, 1)
    return out.transpose(-1, -2)  # (B, H, 1, D)


def _softmax_f32(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim in float32, spelled out: aten's softmax kernel always opens
    a thread-pool region, which costs more than the math for one query (and stalls badly on
    a loaded machine); these elementwise ops stay single-threaded when small."""
    scores = scores.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


@dataclass
class StepPlan:
    """What every temporal layer needs for one step of cache rows `[0, B)`, made once."""

    rows: torch.Tensor  # (B,) arange: the cache rows being stepped
    ring_index: torch.Tensor  # (B,) where this step's key goes
    cos: torch.Tensor  # (B, 1, 1, head_dim // 2) float32 RoPE rotation of this step
    sin: torch.Tensor
    length: int  # ring entries to attend over (static: the caller bounds the filled prefix)
    mask: torch.Tensor | None  # (B, 1, 1, length) valid keys, None when all are valid
    active: torch.Tensor | None  # (B,) rows that advance; None = all


class Attention(nn.Module):
    """Multi-head self-attention; `in_proj_weight` may hold one projection per depformer step."""

    def __init__(self, dim: int, num_heads: int, steps: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(steps * 3 * dim, dim))
        self.out_proj = nn.Linear(dim, steps * dim, bias=False)
        # out_proj.weight is (steps * dim, dim): step s uses rows [s * dim, (s + 1) * dim).
        self.steps = steps
        self.packed_in: list[torch.Tensor | None] = [None] * steps
        self.packed_out: list[torch.Tensor | None] = [None] * steps

    def rows_in(self, step: int) -> slice:
        return slice(step * 3 * self.dim, (step + 1) * 3 * self.dim)

    def rows_out(self, step: int) -> slice:
        return slice(step * self.dim, (step + 1) * self.dim)

    def w_in(self, step: int) -> torch.Tensor:
        return self.in_proj_weight[self.rows_in(step)]

    def w_out(self, step: int) -> torch.Tensor:
        return self.out_proj.weight[self.rows_out(step)]

    def pack(self, enable: bool) -> None:
        steps = range(self.steps)
        self.packed_in = [pack_weight(self.w_in(s)) if enable else None for s in steps]
        self.packed_out = [pack_weight(self.w_out(s)) if enable else None for s in steps]

    def qkv(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Projections of one step `x [B, 1, dim]`: `[B, 3, H, D]` (q, k, v)."""
        w, packed = self.in_proj_weight, self.packed_in[step]
        qkv = linear(x, w, packed, rows=self.rows_in(step))  # (B, 1, 3 * dim)
        return qkv.view(x.shape[0], 3, self.num_heads, self.head_dim)

    def out(self, y: torch.Tensor, residual: torch.Tensor, step: int = 0) -> torch.Tensor:
        """`residual` plus the output projection of heads `y [B, H, 1, D]`."""
        y = y.reshape(y.shape[0], 1, self.dim).to(residual.dtype)  # T = 1: heads are contiguous
        w, packed = self.out_proj.weight, self.packed_out[step]
        return linear(y, w, packed, residual, rows=self.rows_out(step))

    def forward_temporal(
        self, x: torch.Tensor, residual: torch.Tensor, cache: RingKVCache, plan: StepPlan
    ) -> torch.Tensor:
        """`residual` plus attention of one step `x [B, 1, dim]` over the ring cache."""
        qkv = self.qkv(x)
        qk = rotate(qkv[:, :2], plan.cos, plan.sin).to(cache.dtype)  # (B, 2, H, D), q and k
        cache.write(plan.rows, plan.ring_index, qk[:, 1], qkv[:, 2], plan.active)
        keys, values = cache.read(x.shape[0], plan.length)
        q = qk[:, 0, :, None].contiguous()  # a strided query costs 5x in the batched matmul
        y = attend_ring(q, keys, values, plan.mask)  # (B, H, 1, D)
        return self.out(y, residual)


class TemporalLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        f32 = cfg.norm == "rms_norm_f32"
        self.self_attn = Attention(cfg.dim, cfg.num_heads)
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps, f32)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps, f32)
        self.gating = Gating(cfg.dim, cfg.hidden)

    def forward(self, x: torch.Tensor, cache: RingKVCache, plan: StepPlan) -> torch.Tensor:
        x = self.self_attn.forward_temporal(self.norm1(x), x, cache, plan)
        return self.gating(self.norm2(x), residual=x)


class Transformer(nn.Module):
    """Holds `layers` so the official `transformer.layers.N...` names map one to one."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class DepformerLayer(nn.Module):
    """Depformer layer: weights per codebook step, attention over this timestep's codebooks."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        f32 = cfg.norm == "rms_norm_f32"
        d = cfg.depformer_dim
        self.self_attn = Attention(d, cfg.depformer_num_heads, steps=cfg.dep_q)
        self.norm1 = RMSNorm(d, cfg.norm_eps, f32)
        self.norm2 = RMSNorm(d, cfg.norm_eps, f32)
        self.gating = nn.ModuleList([Gating(d, cfg.depformer_hidden) for _ in range(cfg.dep_q)])

    def forward(self, x: torch.Tensor, step: int, kv: DepformerViews) -> torch.Tensor:
        """`x [B, d]` for codebook `step`; `kv` are this layer's scratch views for the step.

        Two dimensions all along (the depformer has one position per call), and at most
        dep_q keys: one fused scaled_dot_product_attention call costs a quarter of the
        spelled-out matmul/softmax ops. The depformer runs this dep_q x layers times per
        step, so every dispatched op saved here counts.
        """
        attn = self.self_attn
        b = x.shape[0]
        h = self.norm1(x)
        qkv = linear(h, attn.in_proj_weight, attn.packed_in[step], rows=attn.rows_in(step))
        qkv = qkv.view(b, 3, attn.num_heads, attn.head_dim)
        kv.write.copy_(qkv[:, 1:])
        y = F.scaled_dot_product_attention(qkv[:, 0, :, None], kv.keys, kv.values)
        out_w, out_packed = attn.out_proj.weight, attn.packed_out[step]
        x = linear(y.view(b, -1), out_w, out_packed, x, rows=attn.rows_out(step))
        return self.gating[step](self.norm2(x), residual=x)


@dataclass
class DepformerViews:
    """One layer's scratch at one codebook step: where this step's key/value go
    (`write [B, 2, H, D]`) and the keys/values of the steps so far (`[B, H, step + 1, D]`)."""

    write: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


class DepformerScratch:
    """Per-layer key/value scratch `[slots, 2, H, dep_q, D]` of the depformer, with its views
    for every batch size, layer and step made once (indexing ops add up at 32 per step)."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers
        self._views: dict[int, list[list[DepformerViews]]] = {}

    def views(self, batch: int) -> list[list[DepformerViews]]:
        """`[step][layer]` views over the first `batch` rows."""
        out = self._views.get(batch)
        if out is None:
            steps = self.buffers[0].shape[3]
            out = [
                [
                    DepformerViews(
                        buf[:batch, :, :, step],
                        buf[:batch, 0, :, : step + 1],
                        buf[:batch, 1, :, : step + 1],
                    )
                    for buf in self.buffers
                ]
                for step in range(steps)
            ]
            self._views[batch] = out
        return out


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class LMModel(nn.Module):
    """Moshi LM weights and single-step compute; streaming state lives in `LMGen`."""

    def __init__(self, cfg: LMConfig, config_name: str = "custom") -> None:
        super().__init__()
        self.config = cfg
        self.config_name = config_name
        f32 = cfg.norm == "rms_norm_f32"
        # Embeddings have one extra row: the initial token (card / text_card).
        self.emb = nn.ModuleList([nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)])
        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
        self.transformer = Transformer([TemporalLayer(cfg) for _ in range(cfg.num_layers)])
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps, f32)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        d = cfg.depformer_dim
        self.depformer_in = nn.ModuleList(
            [nn.Linear(cfg.dim, d, bias=False) for _ in range(cfg.dep_q)]
        )
        self.depformer_emb = nn.ModuleList(
            [nn.Embedding(cfg.card + 1, d) for _ in range(cfg.dep_q - 1)]
        )
        self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, d)
        self.depformer = Transformer([DepformerLayer(cfg) for _ in range(cfg.depformer_num_layers)])
        self.linears = nn.ModuleList([nn.Linear(d, cfg.card, bias=False) for _ in range(cfg.dep_q)])
        self._dep_in_cat: torch.Tensor | None = None
        self._packed: dict[str, torch.Tensor | None] = {}

    # ---- facts used by the generator -------------------------------------------------------
    @property
    def max_delay(self) -> int:
        return self.config.max_delay

    @property
    def device(self) -> torch.device:
        return self.text_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_emb.weight.dtype

    def init_random(self, seed: int = 0) -> None:
        """Seeded truncated-normal weights (std 1/sqrt(fan_in)); RMSNorm scales stay 1."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("alpha"):
                    p.fill_(1.0)
                    continue
                std = 1.0 / p.shape[-1] ** 0.5
                # generate per output row block on CPU in float32, then copy (keeps memory low)
                flat = p.view(p.shape[0], -1)
                for start in range(0, flat.shape[0], 4096):
                    block = flat[start : start + 4096]
                    r = torch.randn(block.shape, generator=gen).clamp_(-3, 3).mul_(std)
                    block.copy_(r.to(device=p.device, dtype=p.dtype))
        self.invalidate_caches()

    def invalidate_caches(self) -> None:
        """Forget derived weights (call after changing parameters in place or moving)."""
        self._dep_in_cat = None
        self.pack_weights(False)

    def pack_weights(self, enable: bool = True) -> None:
        """Keep oneDNN-packed copies of every matmul weight (CPU float32/bfloat16 only).

        Faster single-step matmuls for one more copy of the weights in memory; a no-op on
        other devices. `load_lm(..., pack=True)` (the default on CPU) calls it.
        """
        for module in self.modules():
            if isinstance(module, (Attention, Gating)):
                module.pack(enable)
            elif isinstance(module, RMSNorm):
                module.refresh()
        self._packed = {}
        if enable:
            self._packed["text"] = pack_weight(self.text_linear.weight)
            self._packed["dep_in"] = pack_weight(self._depformer_in_weight())
            for i, lin in enumerate(self.linears):
                self._packed[f"linears.{i}"] = pack_weight(lin.weight)

    def _depformer_in_weight(self) -> torch.Tensor:
        cat = self._dep_in_cat
        w0 = self.depformer_in[0].weight
        if cat is None or cat.device != w0.device or cat.dtype != w0.dtype:
            cat = torch.cat([lin.weight for lin in self.depformer_in], 0).detach()
            self._dep_in_cat = cat
        return cat

    def new_kv_caches(self, slots: int) -> nn.ModuleList:
        """One RingKVCache per temporal layer for `slots` sessions (preallocated)."""
        cfg = self.config
        hd = cfg.dim // cfg.num_heads
        kd, vd = kv_cache_dtypes(self.dtype, self.device)
        return nn.ModuleList(
            [
                RingKVCache(slots, cfg.num_heads, cfg.context, hd, kd, self.device, vd)
                for _ in range(cfg.num_layers)
            ]
        )

    def plan_step(
        self,
        rows: torch.Tensor,
        steps: torch.Tensor,
        length: int,
        masked: bool,
        active: torch.Tensor | None = None,
    ) -> StepPlan:
        """Ring index, RoPE angles and attention span for cache rows `rows = arange(B)` at
        absolute `steps[B]`.

        `length` (a Python int, so the step has static shapes) bounds the ring entries any
        row holds after this write; `masked` says some row holds fewer (then a mask hides
        the rest). Callers know both without reading the device: the generator mirrors the
        step counters on the host; a captured step passes (context, True).
        """
        cfg = self.config
        mask = None
        if masked:
            count = torch.clamp(steps + 1, max=cfg.context)  # valid entries after this write
            span = torch.arange(length, device=steps.device)
            mask = (span[None, :] < count[:, None])[:, None, None, :]  # (B, 1, 1, L)
        angles = rope_angles(steps, 1, cfg.dim // cfg.num_heads, cfg.max_period)[:, None]
        return StepPlan(
            rows=rows,
            ring_index=steps % cfg.context,
            cos=torch.cos(angles),  # (B, 1, 1, head_dim // 2)
            sin=torch.sin(angles),
            length=length,
            mask=mask,
            active=active,
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the 1 + n_q stream embeddings: `tokens [B, K]` -> `[B, 1, dim]`."""
        x = self.emb[0](tokens[:, 1])
        for i in range(1, self.config.n_q):
            x = x + self.emb[i](tokens[:, 1 + i])
        x = x + self.text_emb(tokens[:, 0])
        return x[:, None]

    def temporal_step(
        self, tokens: torch.Tensor, caches: nn.ModuleList, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One temporal step: `(hidden [B, 1, dim], text_logits [B, text_card])`."""
        x = self.embed(tokens)
        for layer, cache in zip(self.transformer.layers, caches):
            x = layer(x, cache, plan)
        x = self.out_norm(x)
        return x, linear(x, self.text_linear.weight, self._packed.get("text"))[:, 0]

    def temporal_prefill(
        self, tokens: torch.Tensor, caches: nn.ModuleList, row: int, chunk: int = 256
    ) -> None:
        """Fill cache `row` (fresh, position 0) with the history whose step inputs are
        `tokens [T, K]`: what T streaming steps would have written, in T / chunk forwards.

        A failover replay knows every input token in advance (the user's codes and the
        tokens the session sampled), so the temporal transformer takes them like a prompt:
        each chunk's queries attend to the ring as it was before the chunk plus the chunk
        itself (causally, within the context), then the chunk's keys and values go into
        the ring. No depformer, no sampling: only the cache matters.
        """
        cfg = self.config
        ctx, h = cfg.context, cfg.num_heads
        hd = cfg.dim // h
        dev = self.device
        chunk = max(1, min(chunk, ctx))
        total = tokens.shape[0]
        tokens = tokens.to(dev)
        for start in range(0, total, chunk):
            c = min(chunk, total - start)
            qpos = torch.arange(start, start + c, device=dev)  # (c,)
            # position held by each filled ring entry before this chunk (entries fill in
            # ring order, so the first min(start, ctx) are the filled ones)
            filled = min(start, ctx)
            j = torch.arange(filled, device=dev)
            kpos = torch.cat([(start - 1) - torch.remainder(start - 1 - j, ctx), qpos])
            delta = qpos[:, None] - kpos[None, :]  # (c, ctx + c)
            allowed = (delta >= 0) & (delta < ctx)
            angles = rope_angles(qpos[:1], c, hd, cfg.max_period)[0][:, None]  # (c, 1, hd/2)
            cos, sin = torch.cos(angles), torch.sin(angles)
            ring = qpos % ctx
            x = self.embed(tokens[start : start + c]).view(1, c, cfg.dim)
            for layer, cache in zip(self.transformer.layers, caches):
                attn = layer.self_attn
                qkv = linear(layer.norm1(x), attn.in_proj_weight, attn.packed_in[0])
                qkv = qkv.view(c, 3, h, hd)
                q = rotate(qkv[:, 0], cos, sin).transpose(0, 1)  # (H, c, hd) float32
                k = rotate(qkv[:, 1], cos, sin).to(cache.k.dtype).transpose(0, 1)
                v = qkv[:, 2].to(cache.v_t.dtype).transpose(0, 1)  # (H, c, hd)
                k_row, vt_row = cache.k[row], cache.v_t[row]  # (H, ctx, hd), (H, hd, ctx)
                keys = torch.cat([k_row[:, :filled], k], dim=1).float()
                values = torch.cat([vt_row[..., :filled].mT, v], dim=1).float()
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
                k_row[:, ring] = k
                vt_row[:, :, ring] = v.mT
                y = y.transpose(0, 1).reshape(1, c, cfg.dim).to(x.dtype)  # (1, c, dim)
                x = linear(y, attn.out_proj.weight, attn.packed_out[0], x)
                x = layer.gating(layer.norm2(x), residual=x)

    def depformer_inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """All dep_q input projections of the temporal output at once: `[B, dep_q, d]`."""
        b = hidden.shape[0]
        out = linear(hidden, self._depformer_in_weight(), self._packed.get("dep_in"))
        return out.view(b, self.config.dep_q, -1)

    def depformer_step(
        self, step: int, dep_in: torch.Tensor, prev_token: torch.Tensor, kv: list[DepformerViews]
    ) -> torch.Tensor:
        """Logits `[B, card]` of codebook `step` given the previous token (text for step 0)."""
        if step == 0:
            tok = self.depformer_text_emb(prev_token)
        else:
            tok = self.depformer_emb[step - 1](prev_token)
        x = dep_in[:, step] + tok  # (B, d)
        for layer, layer_kv in zip(self.depformer.layers, kv):
            x = layer(x, step, layer_kv)
        return linear(x, self.linears[step].weight, self._packed.get(f"linears.{step}"))

    def new_depformer_scratch(self, batch: int) -> DepformerScratch:
        """Key/value scratch of the depformer for up to `batch` rows (`kv` of depformer_step:
        `scratch.views(b)[step]`)."""
        cfg = self.config
        hd = cfg.depformer_dim // cfg.depformer_num_heads
        shape = (batch, 2, cfg.depformer_num_heads, cfg.dep_q, hd)
        return DepformerScratch(
            [
                torch.zeros(shape, dtype=self.dtype, device=self.device)
                for _ in range(cfg.depformer_num_layers)
            ]
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_SPLIT_PROJ = re.compile(r"^(.*\.self_attn)\.(in_projs|out_projs)\.(\d+)\.weight$")


def _official_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the reference's alternative spellings into the fused official names.

    Files saved from the reference's modules carry `self_attn.in_projs.N.weight` (one per
    depformer step); the published checkpoints carry one fused `self_attn.in_proj_weight`.
    """
    out: dict[str, torch.Tensor] = {}
    split: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _SPLIT_PROJ.match(name)
        if m:
            split.setdefault((m.group(1), m.group(2)), {})[int(m.group(3))] = t
        elif name.endswith(".self_attn.in_proj.weight"):
            out[name.removesuffix(".in_proj.weight") + ".in_proj_weight"] = t
        else:
            out[name] = t
    for (prefix, kind), parts in split.items():
        if sorted(parts) != list(range(len(parts))):
            raise CheckpointError(f"{prefix}.{kind}: non-contiguous step indices {sorted(parts)}")
        fused = torch.cat([parts[i] for i in range(len(parts))], 0)
        out[prefix + (".in_proj_weight" if kind == "in_projs" else ".out_proj.weight")] = fused
    return out


def load_lm(
    weights: str | Path | None,
    config: str | Path | dict | LMConfig = "small",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    pack: bool = True,
) -> LMModel:
    """Build the Moshi LM from a preset/config.json and load official weights strictly.

    `weights=None` gives seeded random weights (announced with a warning): the whole pipeline
    then runs anywhere, but it says nothing meaningful. `pack` keeps oneDNN-packed copies of
    the matmul weights on CPU (faster steps, twice the weight memory).
    """
    cfg, name = resolve_config(config)
    device = torch.device(device)
    with torch.device("meta"):
        model = LMModel(cfg, name)
    model = model.to(dtype).to_empty(device=device)
    if weights is None:
        logger.warning(
            "Moshi LM %s: NO WEIGHTS GIVEN, using seeded RANDOM weights (seed %d); "
            "output is meaningless noise",
            name,
            seed,
        )
        model.init_random(seed)
    else:
        tensors = _official_names(read_safetensors(weights))
        load_state_strict(model, tensors, source=str(weights))
        model.invalidate_caches()
    model.eval()
    model.requires_grad_(False)
    if pack:
        model.pack_weights()
    return model
