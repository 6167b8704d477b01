"""The Moshi language model: Helium temporal transformer + depth transformer ("depformer").

Read top to bottom, gpt-fast style: a config dataclass parsed from kyutai's official
`config.json` keys, plain modules whose state-dict names *are* the official checkpoint names
(`transformer.layers.0.self_attn.in_proj_weight`, ...), and one step of the model for rows
`[0, B)` of a per-row ring KV cache (`streaming.RingKVCache`). Streaming state (step counters,
token buffers, sampling) lives in `lm_gen.LMGen`.

Per step and per session the model sees 1 + n_q tokens (text, Moshi's dep_q audio streams, the
user's n_q - dep_q audio streams), sums their embeddings, runs the temporal transformer (RoPE,
RMSNorm, SiLU-gated FFN, causal attention over at most `context` past steps), predicts the text
token, then runs the depformer dep_q times (one set of weights per codebook, no positions,
attention over the codebooks of the same step) to predict Moshi's audio codes one by one.

This file is the math in plain torch (`F.linear`, attention written out as two products
and a float32 softmax): a model runs as soon as it is loaded, on any device. A step and a
failover prefill run the same layer code (`TemporalLayer.forward`, one query per row or a
chunk of queries). Device seams: each module lists in `device_seams` what a device-specific
form may replace per instance with the same function (the matmuls of `Linear` and
`Attention`, `TemporalLayer.attend`, `LMModel.kv_dtypes`); `cpu_fast.prepare_lm_for_cpu`
does, from above (the engine and the benchmarks call it); this file never imports it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moshi_grpc.models.checkpoint import (
    fold_attention_layouts,
    load_state_strict,
    read_safetensors,
    served_depformer_steps,
)
from moshi_grpc.models.rope import rope_angles, rope_tables, rotate
from moshi_grpc.models.streaming import RingKVCache, ring_key_positions, ring_mask
from moshi_grpc.models.validation import LMConfigError, check_lm_config, parse_lm_config

logger = logging.getLogger(__name__)

__all__ = ["LMConfig", "LMModel", "LMConfigError", "load_lm", "PRESETS"]


# --------------------------------------------------------------------------------------------
# Configuration (official kyutai config.json keys)
# --------------------------------------------------------------------------------------------


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
    # Not a kyutai key: the depformer steps of the checkpoint when it predicts every stream
    # (NVIDIA PersonaPlex: its config is moshiko's with dep_q = n_q = 16, the user's half of
    # the steps always teacher-forced). Parsing keeps `dep_q` = Moshi's own streams (n_q / 2)
    # and records the checkpoint's 16 here; `to_dict` gives `dep_q` = 16 back.
    depformer_steps: int | None = None

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def persona(self) -> bool:
        """A PersonaPlex model: sessions start with voice and role prompts, the generator
        takes the user's codes one step late and attends one key fewer once the ring is
        full (its reference's rules; see moshi_grpc/models/persona.py)."""
        return self.depformer_steps is not None

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

    # ---- parsing (rules in validation.py) -------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LMConfig:
        """Parse an official config.json dict; unknown or missing keys raise LMConfigError."""
        return parse_lm_config(cls, raw)

    def to_dict(self) -> dict[str, Any]:
        """The official config.json form (metadata keys included)."""
        out = asdict(self)
        out.update(out.pop("extra"))
        steps = out.pop("depformer_steps")
        if steps is not None:
            out["dep_q"] = steps
        return out

    def validate(self) -> None:
        """Reject values this implementation does not run (rather than run them wrongly)."""
        check_lm_config(self)


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


def _sized(
    dim: int, heads: int, layers: int, dep_dim: int, dep_heads: int, dep_layers: int, **more: Any
) -> dict[str, Any]:
    """Moshiko's config at other sizes (temporal and depformer widths, heads, layers)."""
    return _derive(
        dim=dim,
        num_heads=heads,
        num_layers=layers,
        depformer_dim=dep_dim,
        depformer_num_heads=dep_heads,
        depformer_num_layers=dep_layers,
        depformer_dim_feedforward=int(4.125 * dep_dim),
        **more,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "moshiko-7b": _MOSHIKO_7B,
    # Mid-size model for the CPU benchmark: real vocabularies and stream layout.
    "mid": _sized(1024, 8, 12, 512, 8, 4),
    # CPU demo: real vocab layout (32000 text / 2048 audio, 8+8 streams), tiny dims.
    "small": _sized(128, 4, 2, 64, 2, 1),
    # NVIDIA PersonaPlex (nvidia/personaplex-7b-v1): moshiko's network, its depformer over
    # all 16 streams (the checkpoint's steps 8..15, the user's, are left unused here).
    "personaplex-7b": _derive(dep_q=16),
    # CPU demo of persona sessions: the small preset in PersonaPlex's layout.
    "personaplex-small": _sized(128, 4, 2, 64, 2, 1, dep_q=16),
    # Unit tests: tiny vocabularies too.
    "tiny": _sized(64, 4, 2, 32, 2, 2, text_card=200, card=64, context=16),
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


class RMSNorm(nn.Module):
    """RMSNorm with the checkpoint's `alpha [1, 1, dim]`; statistics in float32 if asked."""

    def __init__(self, dim: int, eps: float, f32: bool) -> None:
        super().__init__()
        self.eps = eps
        self.f32 = f32
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `x [..., dim]` (any number of leading dimensions)."""
        xf = x.float() if self.f32 else x
        var = self.eps + torch.mean(xf * xf, dim=-1, keepdim=True)  # (..., 1)
        return (xf * (self.alpha.view(-1).to(xf.dtype) * torch.rsqrt(var))).to(x.dtype)


class Linear(nn.Linear):
    """A bias-free `nn.Linear` (the checkpoint's `<name>.weight`); its `forward`, the
    matmul, is a device seam."""

    device_seams: ClassVar[tuple[str, ...]] = ("forward",)

    def __init__(self, din: int, dout: int) -> None:
        super().__init__(din, dout, bias=False)


class Gating(nn.Module):
    """SiLU-gated FFN: linear_in -> [a, b] -> silu(a) * b -> linear_out."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = Linear(dim, 2 * hidden)
        self.linear_out = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x)  # (..., 2 * hidden)
        h = h.view(*h.shape[:-1], 2, -1)  # (..., 2, hidden): a, b
        return self.linear_out(F.silu(h[..., 0, :]) * h[..., 1, :])  # (..., dim)


class Attention(nn.Module):
    """Multi-head self-attention projections (names as published).

    The depformer has one set of weights per codebook step: `in_proj_weight` then stacks
    `steps` fused (q, k, v) projections along its rows, and `out_proj.weight` `steps` output
    projections; step `s` uses its own block of rows. `project_in`/`project_out` (the
    matmuls) are device seams.
    """

    device_seams: ClassVar[tuple[str, ...]] = ("project_in", "project_out")

    def __init__(self, dim: int, num_heads: int, steps: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.steps = steps
        self.in_proj_weight = nn.Parameter(torch.empty(steps * 3 * dim, dim))
        self.out_proj = nn.Linear(dim, steps * dim, bias=False)

    def w_in(self, step: int = 0) -> torch.Tensor:
        """Step `step`'s fused (q, k, v) projection `[3 * dim, dim]` (a view)."""
        return self.in_proj_weight[step * 3 * self.dim : (step + 1) * 3 * self.dim]

    def w_out(self, step: int = 0) -> torch.Tensor:
        """Step `step`'s output projection `[dim, dim]` (a view)."""
        return self.out_proj.weight[step * self.dim : (step + 1) * self.dim]

    def project_in(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """`x [..., dim]` -> q, k, v `[..., 3 * dim]`."""
        return F.linear(x, self.w_in(step))

    def project_out(self, y: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Heads `y [..., dim]` -> `[..., dim]`."""
        return F.linear(y, self.w_out(step))


@dataclass
class StepPlan:
    """What every temporal layer needs for one call on cache rows `[0, B)`, made once: a
    step (T = 1 query per row) or a prefill chunk (T queries of one row)."""

    ring_index: torch.Tensor  # (B, T) where this call's keys and values go
    cos: torch.Tensor  # (B, T, 1, 1, head_dim) float32 RoPE tables (`rope_tables`)
    sin: torch.Tensor
    length: int  # ring entries to attend over (static: the caller bounds the filled prefix)
    mask: torch.Tensor | None  # (B, 1, T, keys) visible keys, None when all are
    active: torch.Tensor | None  # (B,) rows that advance; None = all
    # a prefill chunk attends to the ring as it was plus the chunk itself; a step writes
    # its key and value first, then attends to the ring
    chunk: bool = False


def attend_ring(
    q: torch.Tensor, keys: torch.Tensor, values_t: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Queries `q [B, H, T, D]` over keys `[B, H, L, D]` and transposed values
    `[B, H, D, L]`: softmax(q k^T / sqrt(D)) v, scores in the keys' dtype, softmax in
    float32, weights in the values' dtype -> `[B, H, T, D]`.

    Written out rather than `scaled_dot_product_attention` (which wants row-major values)
    as two products, q k^T then p v, each reading the ring through a transposed view.
    Which product form is fastest depends on the CPU's BLAS and the dtype: a device form
    may replace it (`TemporalLayer.attend`)."""
    scores = torch.matmul(q, keys.transpose(-1, -2))  # (B, H, T, L)
    weights = softmax_f32(scores.mul_(q.shape[-1] ** -0.5), mask).to(values_t.dtype)
    return torch.matmul(weights, values_t.transpose(-1, -2))  # (B, H, T, D)


def softmax_f32(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim in float32, hidden (`~mask`) entries zero, spelled out:
    aten's softmax kernel always opens a thread-pool region, which costs more than the math
    for one query (and stalls on a loaded machine); these elementwise ops stay
    single-threaded when small. Works in place on `scores` (a temporary of the caller's): a
    fresh buffer per op costs more than its math at thousands of keys."""
    scores = scores.float()
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    e = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


class TemporalLayer(nn.Module):
    device_seams: ClassVar[tuple[str, ...]] = ("attend",)
    attend = staticmethod(attend_ring)  # the attention kernel

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        f32 = cfg.norm == "rms_norm_f32"
        self.self_attn = Attention(cfg.dim, cfg.num_heads)
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps, f32)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps, f32)
        self.gating = Gating(cfg.dim, cfg.hidden)

    def forward(
        self, x: torch.Tensor, cache: RingKVCache, layer: int, plan: StepPlan
    ) -> torch.Tensor:
        """`x [B, T, dim]` of cache rows `[0, B)`; this call's keys and values go into ring
        layer `layer` (see `StepPlan.chunk` for what the queries see)."""
        attn = self.self_attn
        b, t, _ = x.shape
        qkv = attn.project_in(self.norm1(x))  # (B, T, 3 * dim)
        qkv = qkv.view(b, t, 3, attn.num_heads, attn.head_dim)  # (B, T, 3, H, D)
        qk = rotate(qkv[:, :, :2], plan.cos, plan.sin, cache.key_dtype)  # (B, T, 2, H, D)
        k, v = qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)  # (B, H, T, D)
        if plan.chunk:
            ring_keys, ring_values_t = cache.read(layer, b, plan.length)
            keys = torch.cat([ring_keys, k], dim=2)  # (B, H, length + T, D)
            values_t = torch.cat([ring_values_t, v.to(cache.value_dtype).mT], dim=-1)
            cache.write(layer, k, v, plan.ring_index)  # after the copies above
        else:
            cache.write(layer, k, v, plan.ring_index, plan.active)
            keys, values_t = cache.read(layer, b, plan.length)  # (B, H, L, D), (B, H, D, L)
        q = qk[:, :, 0].transpose(1, 2).contiguous()  # (B, H, T, D); strided is slow to multiply
        y = self.attend(q, keys, values_t, plan.mask)  # (B, H, T, D)
        x = x + attn.project_out(y.transpose(1, 2).reshape(b, t, attn.dim).to(x.dtype))
        return x + self.gating(self.norm2(x))


class Transformer(nn.Module):
    """Holds `layers` so the official `transformer.layers.N...` names map one to one."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


@dataclass
class DepformerViews:
    """One layer's scratch at one codebook step: where this step's key/value go
    (`write [B, 2, H, D]`) and the keys/values of the steps so far (`[B, H, step + 1, D]`)."""

    write: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


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

        Two dimensions all along: the depformer has one position per call and at most dep_q
        keys, attended with one fused `scaled_dot_product_attention` call.
        """
        attn = self.self_attn
        b = x.shape[0]
        qkv = attn.project_in(self.norm1(x), step)  # (B, 3 * d)
        qkv = qkv.view(b, 3, attn.num_heads, attn.head_dim)  # (B, 3, H, D)
        kv.write.copy_(qkv[:, 1:])
        y = F.scaled_dot_product_attention(qkv[:, 0, :, None], kv.keys, kv.values)  # (B,H,1,D)
        x = x + attn.project_out(y.view(b, -1), step)  # (B, d)
        return x + self.gating[step](self.norm2(x))


class DepformerScratch:
    """Per-layer key/value scratch `[rows, 2, H, dep_q, D]` of the depformer, with its views
    for every batch size, layer and step made once (the depformer runs dep_q x layers
    attention calls per step; slicing them anew each time adds up)."""

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

    device_seams: ClassVar[tuple[str, ...]] = ("kv_dtypes",)
    # Storage dtypes (keys, values) of the temporal KV cache; None = the model's dtype.
    kv_dtypes: tuple[torch.dtype, torch.dtype] | None = None

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
        self.text_linear = Linear(cfg.dim, cfg.text_card)
        d = cfg.depformer_dim
        self.depformer_in = nn.ModuleList([Linear(cfg.dim, d) for _ in range(cfg.dep_q)])
        self.depformer_emb = nn.ModuleList(
            [nn.Embedding(cfg.card + 1, d) for _ in range(cfg.dep_q - 1)]
        )
        self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, d)
        self.depformer = Transformer([DepformerLayer(cfg) for _ in range(cfg.depformer_num_layers)])
        self.linears = nn.ModuleList([Linear(d, cfg.card) for _ in range(cfg.dep_q)])

    # ---- facts used by the generator -------------------------------------------------------
    @property
    def max_delay(self) -> int:
        return self.config.max_delay

    @property
    def window(self) -> int:
        """Keys a query may attend (its own step included). The context, except for a
        PersonaPlex model: its reference's ring cache hides the oldest entry once full
        (NVIDIA/personaplex transformer.py labels that slot with a future position), so
        its queries see context - 1 keys; matched here so that its sessions keep its tokens
        past the first context steps (docs/PERSONAPLEX.md, section 8)."""
        cfg = self.config
        return cfg.context - 1 if cfg.persona else cfg.context

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

    # ---- per-row state ---------------------------------------------------------------------
    def new_kv_cache(self, rows: int) -> RingKVCache:
        """The temporal transformer's ring KV cache for `rows` sessions (preallocated)."""
        cfg = self.config
        kd, vd = self.kv_dtypes or (self.dtype, self.dtype)
        return RingKVCache(
            cfg.num_layers,
            rows,
            cfg.num_heads,
            cfg.context,
            cfg.dim // cfg.num_heads,
            device=self.device,
            dtype=kd,
            value_dtype=vd,
            values_transposed=True,  # see `attend_ring`
        )

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

    # ---- one step --------------------------------------------------------------------------
    def plan_step(
        self,
        steps: torch.Tensor,
        length: int,
        masked: bool,
        active: torch.Tensor | None = None,
    ) -> StepPlan:
        """Ring index, RoPE tables and attention span for cache rows `[0, B)` at absolute
        `steps [B]`.

        `length` (a Python int, so the step has static shapes) bounds the ring entries any
        row holds after this write; `masked` says some row holds fewer (then a mask hides
        the rest). Callers know both without reading the device: the generator mirrors the
        step counters on the host; a captured step passes (context, True).
        """
        cfg = self.config
        mask = None
        if masked:
            kpos = ring_key_positions(steps, cfg.context, length)  # (B, L)
            mask = ring_mask(steps[:, None], kpos, self.window)  # (B, 1, 1, L)
        angles = rope_angles(steps, 1, cfg.dim // cfg.num_heads, cfg.max_period)  # (B, 1, D/2)
        cos, sin = rope_tables(angles[:, :, None, None])  # (B, 1, 1, 1, D): over (q, k), heads
        return StepPlan(
            ring_index=(steps % cfg.context)[:, None],
            cos=cos,
            sin=sin,
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
        self, tokens: torch.Tensor, cache: RingKVCache, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `[0, B)` one step on: `(hidden [B, 1, dim], text logits [B, text_card])`."""
        x = self.embed(tokens)  # (B, 1, dim)
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, cache, i, plan)
        x = self.out_norm(x)
        return x, self.text_linear(x)[:, 0]

    def depformer_step(
        self, step: int, hidden: torch.Tensor, prev_token: torch.Tensor, kv: list[DepformerViews]
    ) -> torch.Tensor:
        """Logits `[B, card]` of codebook `step`, from the temporal output `hidden [B, 1, dim]`
        and the previous token (the text token for step 0)."""
        if step == 0:
            tok = self.depformer_text_emb(prev_token)
        else:
            tok = self.depformer_emb[step - 1](prev_token)
        x = self.depformer_in[step](hidden[:, 0]) + tok  # (B, d)
        for layer, layer_kv in zip(self.depformer.layers, kv):
            x = layer(x, step, layer_kv)
        return self.linears[step](x)

    # ---- replay ----------------------------------------------------------------------------
    def plan_chunk(self, start: int, steps: int) -> StepPlan:
        """The plan of one prefill chunk: absolute steps `[start, start + steps)` of a row
        whose ring holds the steps before `start` (within the context)."""
        cfg = self.config
        ctx, dev = cfg.context, self.device
        qpos = torch.arange(start, start + steps, device=dev)[None]  # (1, T)
        filled = min(start, ctx)  # ring entries written before this chunk
        before = ring_key_positions(qpos[:, 0] - 1, ctx, filled)  # (1, filled)
        mask = ring_mask(qpos, torch.cat([before, qpos], 1), self.window)  # (1, 1, T, filled + T)
        angles = rope_angles(qpos[:, 0], steps, cfg.dim // cfg.num_heads, cfg.max_period)
        cos, sin = rope_tables(angles[:, :, None, None])  # (1, T, 1, 1, D)
        return StepPlan(qpos % ctx, cos, sin, filled, mask, None, chunk=True)

    def temporal_prefill(
        self,
        tokens: torch.Tensor,
        cache: RingKVCache,
        row: int,
        chunk: int = 256,
        start: int = 0,
    ) -> None:
        """Fill cache `row` with the steps `start .. start + T - 1` whose inputs are
        `tokens [T, K]` (the row holds the steps before `start`): what T streaming steps
        would have written, in T / chunk forwards. The row's position is not changed.

        A failover replay knows every input token in advance (the user's codes and the
        tokens the session sampled), so the temporal transformer takes them like a prompt,
        through the step's own layer code: each chunk's queries attend to the ring as it
        was before the chunk plus the chunk itself (causally, within the context), then the
        chunk's keys and values go into the ring. No depformer, no sampling: only the cache
        matters. The arithmetic is the step's, dtype for dtype (queries and keys rotated
        into the cache's key dtype, scores in it, softmax in float32, weights in the value
        dtype, the same `attend`); only the matmuls' row and key counts differ. Measured on
        CPU (random weights, a 300-step history in chunks of 256 against 300 forced steps,
        then 32 teacher-forced steps): in float32 the cache within 3e-6 and every greedy
        token equal; in bfloat16 (mid preset) the cache within 0.0625 (one bf16 step at
        its scale), text logits within 0.0625 of a peak of 5, greedy text tokens 32 of 32
        (31 with the CPU forms), audio 245 of 256 (near-flat random logits tie). One step
        per chunk is the step, bit for bit in bfloat16. tests/test_lm.py pins this.
        """
        chunk = max(1, min(chunk, self.config.context))
        view = cache.row(row)
        tokens = tokens.to(self.device)
        for first in range(0, tokens.shape[0], chunk):
            part = tokens[first : first + chunk]
            plan = self.plan_chunk(start + first, part.shape[0])
            x = self.embed(part).view(1, part.shape[0], -1)  # (1, T, dim)
            for i, layer in enumerate(self.transformer.layers):
                x = layer(x, view, i, plan)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_lm(
    weights: str | Path | None,
    config: str | Path | dict | LMConfig = "small",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LMModel:
    """Build the Moshi LM from a preset/config.json and load official weights strictly.

    `weights=None` gives seeded random weights (announced with a warning): the whole pipeline
    then runs anywhere, but it says nothing meaningful. Either attention layout of the file
    loads (see `checkpoint.fold_attention_layouts`). The model is ready to run as returned;
    `cpu_fast.prepare_lm_for_cpu` adds the faster CPU forms.
    """
    cfg, name = resolve_config(config)
    device = torch.device(device)
    tensors = None
    if weights is not None:
        source = str(weights)
        tensors = fold_attention_layouts(read_safetensors(weights), source=source)
        if not cfg.persona and f"linears.{cfg.dep_q}.weight" in tensors:
            # A PersonaPlex file under a moshiko config: its depformer covers every stream.
            cfg = replace(cfg, depformer_steps=cfg.n_q)
            logger.info("%s: PersonaPlex layout detected (%d depformer steps)", source, cfg.n_q)
        if cfg.persona:
            tensors = served_depformer_steps(
                tensors, cfg.dep_q, cfg.depformer_steps, cfg.depformer_dim, source
            )
    with torch.device("meta"):
        model = LMModel(cfg, name)
    model = model.to(dtype).to_empty(device=device)
    if tensors is None:
        logger.warning(
            "Moshi LM %s: NO WEIGHTS GIVEN, using seeded RANDOM weights (seed %d); "
            "output is meaningless noise",
            name,
            seed,
        )
        model.init_random(seed)
    else:
        load_state_strict(model, tensors, source=source)
    model.eval()
    model.requires_grad_(False)
    return model
