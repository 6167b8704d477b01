"""Mimi, the neural audio codec of Moshi: 24 kHz mono audio <-> 12.5 Hz RVQ codes.

Read top to bottom:

1. `MimiConfig` and its presets (`"mimi"` is the published 79 M model, `"tiny"` a small one
   for tests and demos).
2. Building blocks. Every causal convolution keeps, per stream row, the few input steps
   that the next call needs (its left context); a transposed convolution keeps its last
   input step. The offline path is the same code run once over the whole signal from a
   fresh (zero) state, so streaming equals offline by construction.
3. The SEANet encoder/decoder, the two transformers (RoPE, context 250 steps at 25 Hz,
   layer scale), the learned down/upsampling 25 Hz <-> 12.5 Hz and the split RVQ.
4. `Mimi`: offline `encode`/`decode`, and `encode_frames`/`decode_frames`, the forward
   passes from given states that the streamers (`mimi_streaming.py`: rows of state, one
   80 ms frame per row per call) run; `load_mimi`.

The exact model in plain torch (conv1d, conv_transpose1d, linear, matmul, softmax, cdist),
ready as soon as it is built or loaded. Activations are time-major (N, T, C), the
transformer's layout; the convolutions see their input as (N, C, T) views. Input checks
live in `validation.py`, the Hugging Face name conversion in `mimi_hf.py`. Module and
parameter names are the official checkpoint's tensor names: loading is a strict copy.

Device seams: each module lists in `device_seams` the methods that a device-specific form
may replace per instance with a function of the same result (`cpu_fast.py` does, from
above; this file never imports it): `StreamingConv1d.apply_conv`,
`StreamingConvTranspose1d.apply_convtr`, the four matmuls of `TransformerLayer`, and
`ResidualVQ.project_in/project_out/codebooks/quantize`.

Streaming state has the row (a stream's place) as its first dimension; a step runs on a
row prefix and writes every state in place (conv caches with `torch.where` for masked
rows, the transformers' ring KV caches at per-row positions: see `_attend`), with no
Python branch on per-row values and no wait on the device, so it can be captured. Rows
never mix: a row's output depends on its own input and state only (the attention is
written out for that, see `attend`), up to the last bits where a matmul kernel rounds one
or two rows differently from more.

Exactness note: the attention of a query at step p sees steps p-249..p (context 250). A
streaming frame brings two 25 Hz steps at once, so the ring holds context + 1 steps; the
public reference keeps only 250 and its first query of a frame then misses one step once a
stream is longer than 10 s (its streaming output drifts from its own offline output there).
We follow the offline definition, so our streaming equals our offline path at any length.
Offline `encode`/`decode` run the convolutions over the whole signal at once (memory grows
with its length) and the transformers `context` steps a call over a fresh ring.

Precision: float32 is the exact path (codes identical to the reference, pcm within 1e-4).
bfloat16/float16 run end to end, with codebooks, distances, RoPE and softmax in float32;
their codes follow float32 only where residual centroids are not near ties (deep RVQ
levels diverge first) and, in half precision, streaming is not bit-equal to offline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moshi_grpc.models.checkpoint import (
    CheckpointError,
    fold_attention_layouts,
    load_state_strict,
    read_safetensors,
)
from moshi_grpc.models.mimi_hf import hf_to_official, is_hf_layout
from moshi_grpc.models.rope import rope_angles, rope_tables, rotate
from moshi_grpc.models.streaming import RingKVCache, ring_key_positions, ring_mask
from moshi_grpc.models.validation import MimiInputError, check_codes, check_pcm

if TYPE_CHECKING:
    from moshi_grpc.models.mimi_streaming import MimiStreamingDecoder, MimiStreamingEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Mimi",
    "MimiConfig",
    "MimiInputError",
    "load_mimi",
    "save_mimi",
]


# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MimiConfig:
    """Hyper-parameters of a Mimi codec (defaults = the published model)."""

    name: str = "mimi"
    sample_rate: int = 24000
    frame_rate: float = 12.5
    # SEANet
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    n_residual_layers: int = 1
    dilation_base: int = 2
    compress: int = 2
    # transformers (d_model == dimension)
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10000.0
    layer_scale: float = 0.01
    # split RVQ
    codebook_dim: int = 256
    total_codebooks: int = 32
    semantic_codebooks: int = 1
    bins: int = 2048

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def resample_stride(self) -> int:
        return self.frame_size // self.hop_length

    def validate(self) -> MimiConfig:
        if self.frame_size % self.hop_length:
            raise ValueError(f"frame size {self.frame_size} is not a multiple of {self.ratios}")
        if self.dimension % self.num_heads or (self.dimension // self.num_heads) % 2:
            raise ValueError("dimension must split into heads of even size")
        if not 0 < self.semantic_codebooks < self.total_codebooks:
            raise ValueError("need 1 <= semantic_codebooks < total_codebooks")
        return self


PRESETS: dict[str, MimiConfig] = {
    "mimi": MimiConfig(),
    # Same structure, ~1/100 of the compute: for tests, demos and laptops without weights.
    "tiny": MimiConfig(
        name="tiny",
        dimension=32,
        n_filters=4,
        num_heads=2,
        num_layers=2,
        dim_feedforward=64,
        context=10,
        codebook_dim=4,
        total_codebooks=8,
    ),
}


def _resolve_config(config: str | MimiConfig) -> MimiConfig:
    if isinstance(config, MimiConfig):
        return config.validate()
    if config not in PRESETS:
        raise ValueError(f"unknown Mimi config {config!r}; presets: {sorted(PRESETS)}")
    return PRESETS[config].validate()


# --------------------------------------------------------------------------------------------
# 2. Streaming building blocks
# --------------------------------------------------------------------------------------------


class ConvStates:
    """Reads the old per-row conv states in order and collects the new ones."""

    def __init__(self, old: Sequence[torch.Tensor]):
        self._old = iter(old)
        self.new: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        return next(self._old)

    def give(self, t: torch.Tensor) -> None:
        self.new.append(t)


class _Nest(nn.Module):
    """One level of the official checkpoint's nesting (`<name>.conv.conv.weight`)."""

    def __init__(self, attr: str, module: nn.Module):
        super().__init__()
        setattr(self, attr, module)


class StreamingConv1d(nn.Module):
    """Causal Conv1d on time-major activations (N, T, C).

    The `context` input steps before each call come from the state: zeros at the start
    (constant padding), or the first sample repeated when `replicate` (the downsampler's
    padding). `latent_rate`: the layer runs at the transformer's 25 Hz (two steps per 80 ms
    frame and stream), which lets the CPU forms choose a layout for few rows.
    """

    device_seams: ClassVar[tuple[str, ...]] = ("apply_conv",)

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        replicate: bool = False,
        latent_rate: bool = False,
    ):
        super().__init__()
        self.conv = _Nest(
            "conv", nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, bias=bias)
        )
        self.latent_rate = latent_rate
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        self.span = (kernel - 1) * dilation + 1  # input steps one output step reads
        self.context = self.span - stride  # of which carried over from the previous call
        self.replicate = replicate

    @property
    def weight(self) -> torch.Tensor:
        """(Cout, Cin, kernel), as nn.Conv1d."""
        return self.conv.conv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.conv.bias

    def init_state(self, n: int, device, dtype) -> list[torch.Tensor]:
        if not self.context:
            return []
        cin = self.weight.shape[1]
        state = [torch.zeros(n, self.context, cin, device=device, dtype=dtype)]
        if self.replicate:
            state.append(torch.ones(n, device=device, dtype=torch.bool))  # "first call" flag
        return state

    def forward(self, x: torch.Tensor, states: ConvStates) -> torch.Tensor:
        """x (N, T, Cin), T a multiple of the stride -> (N, T / stride, Cout)."""
        if self.context:
            prev = states.take()  # (N, context, Cin)
            if self.replicate:
                first = states.take()  # (N,) bool
                prev = torch.where(first.view(-1, 1, 1), x[:, :1], prev)
            x = torch.cat([prev, x], dim=1)  # (N, context + T, Cin)
            states.give(x[:, -self.context :])
            if self.replicate:
                states.give(torch.zeros_like(first))
        return self.apply_conv(x)

    def apply_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution, no padding: (N, context + T, Cin) -> (N, T / stride, Cout)."""
        x, w, b = x.transpose(1, 2), self.weight, self.bias  # (N, Cin, T)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # oneDNN's bfloat16 strided conv1d returns wrong values for some lengths on
            # CPU (torch 2.13; e.g. 16 -> 32 channels, kernel 12, stride 6): use float32
            y = F.conv1d(x.float(), w.float(), None if b is None else b.float(), self.stride,
                         dilation=self.dilation)  # fmt: skip
            return y.to(torch.bfloat16).transpose(1, 2)
        return F.conv1d(x, w, b, self.stride, dilation=self.dilation).transpose(1, 2)


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d (kernel = m * stride, m = 1 or 2) on (N, T, C).

    Output block b (`stride` samples) is input step b times the kernel's first `stride`
    taps plus step b - 1 times the rest; the state is the last input step of the previous
    call. Offline this is the reference's output with its incomplete tail dropped.
    """

    device_seams: ClassVar[tuple[str, ...]] = ("apply_convtr",)

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        groups: int = 1,
        bias: bool = True,
        latent_rate: bool = False,
    ):
        super().__init__()
        if kernel % stride or kernel > 2 * stride:
            raise ValueError("transposed conv kernel must be stride or 2 x stride")
        if groups not in (1, cin) or (groups > 1 and cout != cin):
            raise ValueError("only plain or depthwise transposed convolutions are supported")
        self.convtr = _Nest(
            "convtr", nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias)
        )
        self.latent_rate = latent_rate  # input at 25 Hz (see `StreamingConv1d`)
        self.stride, self.kernel, self.groups = stride, kernel, groups
        self.in_channels, self.out_channels = cin, cout
        self.steps = kernel // stride  # input steps per output block: 1 or 2

    @property
    def weight(self) -> torch.Tensor:
        """(Cin, Cout / groups, kernel), as nn.ConvTranspose1d."""
        return self.convtr.convtr.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.convtr.convtr.bias

    def init_state(self, n: int, device, dtype) -> list[torch.Tensor]:
        return [torch.zeros(n, self.steps - 1, self.in_channels, device=device, dtype=dtype)]

    def forward(self, x: torch.Tensor, states: ConvStates) -> torch.Tensor:
        """x (N, T, Cin) -> (N, T * stride, Cout)."""
        if self.steps == 2:  # the previous call's last step feeds this call's first block
            x = torch.cat([states.take(), x], dim=1)  # (N, 1 + T, Cin)
            states.give(x[:, -1:])
        else:
            states.give(states.take())  # (N, 0, Cin): nothing to carry
        return self.apply_convtr(x)

    def apply_convtr(self, x: torch.Tensor) -> torch.Tensor:
        """(N, steps - 1 + T, Cin) -> the T complete output blocks (N, T * stride, Cout)."""
        s = self.stride
        y = F.conv_transpose1d(x.transpose(1, 2), self.weight, self.bias, s, groups=self.groups)
        skip = (self.steps - 1) * s  # block of the carried step: the previous call's output
        t = (x.shape[1] - self.steps + 1) * s
        return y[..., skip : skip + t].transpose(1, 2)


class SEANetResnetBlock(nn.Module):
    """x + conv1x1(elu(conv_k(elu(x)))), true skip; names `block.1` and `block.3`."""

    def __init__(self, dim: int, kernel: int, dilation: int, compress: int):
        super().__init__()
        hidden = dim // compress
        convs = (
            StreamingConv1d(dim, hidden, kernel, dilation=dilation),
            StreamingConv1d(hidden, dim, 1),
        )
        self.block = nn.Sequential(nn.ELU(), convs[0], nn.ELU(), convs[1])
        self.convs = convs  # plain references for the step; `block` gives them their names

    def forward(self, x: torch.Tensor, states: ConvStates) -> torch.Tensor:
        # direct .forward calls: see `_run_seq`
        y = self.convs[0].forward(F.elu(x), states)  # x is still needed: out of place
        y = self.convs[1].forward(F.elu(y, inplace=True), states)
        return y.add_(x)


def _run_seq(model: nn.Sequential, x: torch.Tensor, states: ConvStates) -> torch.Tensor:
    """ELU in place: every layer's output is a fresh tensor read by nothing but the next
    layer, and at larger batches a fresh one per ELU costs memory bandwidth. Layers are
    stepped through `.forward` directly: these internal layers carry no hooks, and
    nn.Module.__call__ around every conv of a frame is measurable at batch 1."""
    for layer in model:
        x = F.elu(x, inplace=True) if isinstance(layer, nn.ELU) else layer.forward(x, states)
    return x


def _init_seq(model: nn.Module, n: int, device, dtype) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, (StreamingConv1d, StreamingConvTranspose1d)):
            out += m.init_state(n, device, dtype)
    return out


class SEANetEncoder(nn.Module):
    """Audio (N, T, 1) -> latent (N, T / hop, dimension) at 25 Hz (time-major)."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        mult = 1
        layers: list[nn.Module] = [StreamingConv1d(1, c.n_filters, c.kernel_size)]
        for i, ratio in enumerate(reversed(c.ratios)):
            ch = mult * c.n_filters
            for j in range(c.n_residual_layers):
                layers.append(
                    SEANetResnetBlock(ch, c.residual_kernel_size, c.dilation_base**j, c.compress)
                )
            last = i == len(c.ratios) - 1  # its output is at 25 Hz
            layers += [nn.ELU(), StreamingConv1d(ch, ch * 2, ratio * 2, ratio, latent_rate=last)]
            mult *= 2
        out = StreamingConv1d(mult * c.n_filters, c.dimension, c.last_kernel_size, latent_rate=True)
        layers += [nn.ELU(), out]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, states: ConvStates) -> torch.Tensor:
        return _run_seq(self.model, x, states)


class SEANetDecoder(nn.Module):
    """Latent (N, T, dimension) at 25 Hz -> audio (N, T * hop, 1) (time-major)."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        mult = 2 ** len(c.ratios)
        first = StreamingConv1d(c.dimension, mult * c.n_filters, c.kernel_size, latent_rate=True)
        layers: list[nn.Module] = [first]
        for i, ratio in enumerate(c.ratios):
            ch = mult * c.n_filters
            tr = StreamingConvTranspose1d(ch, ch // 2, ratio * 2, ratio, latent_rate=i == 0)
            layers += [nn.ELU(), tr]
            for j in range(c.n_residual_layers):
                layers.append(
                    SEANetResnetBlock(
                        ch // 2, c.residual_kernel_size, c.dilation_base**j, c.compress
                    )
                )
            mult //= 2
        layers += [nn.ELU(), StreamingConv1d(c.n_filters, 1, c.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, states: ConvStates) -> torch.Tensor:
        return _run_seq(self.model, x, states)


# --------------------------------------------------------------------------------------------
# 3. Transformer with per-row ring KV cache
# --------------------------------------------------------------------------------------------


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))


@dataclass
class _StepPlan:
    """What every layer of one transformer call shares: RoPE tables, mask, ring indices."""

    cos: torch.Tensor  # (B, 1, T, hd) float32, see `rope_tables`
    sin: torch.Tensor
    hidden: torch.Tensor  # (B, 1, T, S) bool: key s is hidden from query t
    cache: RingKVCache  # rows [0, B) of the ring
    write: torch.Tensor  # (B, T) ring indices of the steps written this call


class Attention(nn.Module):
    """Parameters of the causal multi-head self-attention (names as published); the
    computation is `TransformerLayer.forward` + `_attend`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.heads = heads


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with hidden keys left out, softmax in float32:
    q (B, H, T, hd), k and v (B, H, S, hd), hidden (B, 1, T, S) -> (B, H, T, hd).

    Written out rather than `scaled_dot_product_attention`: PyTorch's fused CPU kernel
    (torch 2.13) rounds a row differently depending on how many rows share the call and on
    the thread count, so a stream's pcm changed with its bucket; these ops compute every
    row alone, and are as fast at a frame's two queries."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, H, T, S)
    weights = torch.softmax(scores.masked_fill_(hidden, float("-inf")).float(), dim=-1)
    return torch.matmul(weights.to(v.dtype), v)


def _attend(qkv: torch.Tensor, plan: _StepPlan, layer: int) -> torch.Tensor:
    """Projected (3, B, H, T, hd) q, k, v -> (B, T, H * hd) head outputs."""
    qk = rotate(qkv[:2], plan.cos, plan.sin)  # q and k in one call
    q, k, v = qk[0], qk[1], qkv[2]  # (B, H, T, hd)
    cache = plan.cache
    # Write this call's steps into the ring, attend to the whole ring. A masked row (no
    # frame this call) writes whatever its zeroed input gives at its position without
    # advancing: those entries hold steps older than the context, and its next real step
    # overwrites them before any query reads them.
    cache.write(layer, k, v, plan.write)
    k, v = cache.read(layer, q.shape[0], cache.capacity)  # (B, H, S, hd) each
    return attend(q, k, v, plan.hidden).transpose(1, 2).flatten(2)


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + s1 * attn(norm1(x)), then x + s2 * ff(norm2(x)), gelu inside."""

    device_seams: ClassVar[tuple[str, ...]] = (
        "in_proj", "out_proj", "feed_forward_in", "feed_forward_out",
    )  # fmt: skip

    def __init__(self, c: MimiConfig):
        super().__init__()
        d = c.dimension
        self.self_attn = Attention(d, c.num_heads)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, c.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(c.dim_feedforward, d, bias=False)
        self.layer_scale_1 = LayerScale(d, c.layer_scale)
        self.layer_scale_2 = LayerScale(d, c.layer_scale)

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.self_attn.in_proj_weight)

    def out_proj(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.self_attn.out_proj.weight)

    def feed_forward_in(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(x, self.linear1.weight))  # exact (erf) GELU

    def feed_forward_out(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear2.weight)

    def forward(self, x: torch.Tensor, plan: _StepPlan, i: int) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, C)
        h = self.self_attn.heads
        n1, n2 = self.norm1, self.norm2
        qkv = self.in_proj(F.layer_norm(x, (d,), n1.weight, n1.bias, 1e-5))  # (B, T, 3C)
        qkv = qkv.view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        x = x + self.layer_scale_1.scale * self.out_proj(_attend(qkv, plan, i))
        y = self.feed_forward_in(F.layer_norm(x, (d,), n2.weight, n2.bias, 1e-5))
        return x + self.layer_scale_2.scale * self.feed_forward_out(y)


class _LayerList(nn.Module):
    """The official nesting `<prefix>.transformer.layers.<i>`."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(c) for _ in range(c.num_layers))


class Transformer(nn.Module):
    """(N, T, C) -> (N, T, C); names `<prefix>.transformer.layers.<i>...` as published."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.transformer = _LayerList(c)
        self.c = c

    def new_cache(self, n: int, steps_per_call: int, device, dtype) -> RingKVCache:
        """Rings for n rows; values row-major, the layout `attend` reads."""
        c = self.c
        return RingKVCache(
            c.num_layers, n, c.num_heads, c.context + steps_per_call - 1,
            c.dimension // c.num_heads, device=device, dtype=dtype,
        )  # fmt: skip

    def _plan(self, b: int, t: int, cache: RingKVCache) -> _StepPlan:
        c = self.c
        cap = cache.capacity
        if t > cap - c.context + 1:
            raise MimiInputError(f"a streaming call brings at most {cap - c.context + 1} steps")
        positions = cache.pos  # (B,)
        angles = rope_angles(positions, t, c.dimension // c.num_heads, c.max_period)
        cos, sin = rope_tables(angles.unsqueeze(1))  # (B, 1, T, hd)
        qpos = positions.view(-1, 1) + torch.arange(t, device=positions.device)  # (B, T)
        kpos = ring_key_positions(qpos[:, -1], cap, cap)  # (B, S) step held by entry j
        hidden = ~ring_mask(qpos, kpos, c.context)
        return _StepPlan(cos, sin, hidden, cache, qpos % cap)

    def forward(
        self,
        x: torch.Tensor,
        cache: RingKVCache | None = None,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows [0, B) of `cache` `T` steps on; without a cache (offline) the whole signal
        from a fresh ring, `context` steps a call (memory bounded by the context)."""
        b, t, _ = x.shape  # (B, T, C)
        if cache is None:
            chunk = min(t, self.c.context)
            cache = self.new_cache(b, chunk, x.device, x.dtype)
            return torch.cat([self.forward(part, cache) for part in x.split(chunk, 1)], 1)
        plan = self._plan(b, t, cache)
        for i, layer in enumerate(self.transformer.layers):
            x = layer.forward(x, plan, i)  # no hooks on internal layers: see `_run_seq`
        cache.commit(b, t, active)
        return x


# --------------------------------------------------------------------------------------------
# 3b. Resampling 25 Hz <-> 12.5 Hz and the split RVQ
# --------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    """Learned strided conv (kernel 2 * stride, no bias, left padding = first sample)."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = StreamingConv1d(
            dim, dim, 2 * stride, stride, bias=False, replicate=True, latent_rate=True
        )

    def forward(self, x: torch.Tensor, states: ConvStates) -> torch.Tensor:
        return self.conv.forward(x, states)


class Upsample(nn.Module):
    """Depthwise transposed conv (kernel 2 * stride, no bias)."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.convtr = StreamingConvTranspose1d(dim, dim, 2 * stride, stride, groups=dim, bias=False)

    def forward(self, x: torch.Tensor, states: ConvStates) -> torch.Tensor:
        return self.convtr.forward(x, states)


class Codebook(nn.Module):
    """Published as EMA sums and usage counts; the centroids are their ratio."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))

    def centroids(self) -> torch.Tensor:
        """(bins, dim) float32."""
        return self.embedding_sum.float() / self.cluster_usage.float().clamp(min=1e-5)[:, None]


class _CodebookSlot(nn.Module):
    """One RVQ level: the official nesting `<rvq>.vq.layers.<i>._codebook`."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self._codebook = Codebook(bins, dim)


class _CodebookList(nn.Module):
    def __init__(self, n: int, bins: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(_CodebookSlot(bins, dim) for _ in range(n))


class ResidualVQ(nn.Module):
    """Projection in (1x1 conv) -> residual VQ of `n_q` levels of `bins` centroids of
    size `dim` -> projection out."""

    device_seams: ClassVar[tuple[str, ...]] = (
        "project_in", "project_out", "codebooks", "quantize",
    )  # fmt: skip

    def __init__(self, n_q: int, bins: int, dim: int, io_dim: int):
        super().__init__()
        self.input_proj = nn.Conv1d(io_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, io_dim, 1, bias=False)
        self.vq = _CodebookList(n_q, bins, dim)
        self.n_q, self.bins, self.dim = n_q, bins, dim

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.input_proj.weight[:, :, 0])

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.output_proj.weight[:, :, 0])

    def codebooks(self, n_q: int) -> torch.Tensor:
        """The first n_q levels' centroids (n_q, bins, dim), float32."""
        return torch.stack([layer._codebook.centroids() for layer in self.vq.layers[:n_q]])

    def quantize(self, r: torch.Tensor, n_q: int) -> torch.Tensor:
        """Residual rows r (M, dim) float32 -> codes (M, n_q): at each level the nearest
        centroid of what the previous levels left."""
        books = self.codebooks(n_q)
        codes: list[torch.Tensor] = []
        for i in range(n_q):
            codes.append(nearest_centroid(r, books[i]))
            if i + 1 < n_q:
                r = r - books[i][codes[-1]]
        return torch.stack(codes, dim=-1)

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        """x (B, T, io_dim) -> codes (B, T, n_q)."""
        r = self.project_in(x).float()  # (B, T, dim)
        return self.quantize(r.reshape(-1, r.shape[-1]), n_q).view(*x.shape[:-1], n_q)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, n_q) -> (B, T, io_dim)."""
        books = self.codebooks(codes.shape[-1])
        q = books[0][codes[..., 0]]  # (B, T, dim)
        for i in range(1, codes.shape[-1]):
            q = q + books[i][codes[..., i]]
        return self.project_out(q.to(self.output_proj.weight.dtype))


def nearest_centroid(r: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(M, dim) rows, (bins, dim) centroids -> (M,) index of the nearest, by Euclidean
    distance rounded as torch.cdist rounds it (what the reference calls), so that near-ties
    in deep residual levels resolve as they do there (the lower index on an exact tie)."""
    return torch.cdist(r.unsqueeze(0), centroids.unsqueeze(0))[0].argmin(-1)


class SplitRVQ(nn.Module):
    """1 semantic codebook (`rvq_first`) + up to 31 acoustic ones (`rvq_rest`), summed."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.n_sem = c.semantic_codebooks
        args = (c.bins, c.codebook_dim, c.dimension)
        self.rvq_first = ResidualVQ(c.semantic_codebooks, *args)
        self.rvq_rest = ResidualVQ(c.total_codebooks - c.semantic_codebooks, *args)

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        """x (B, T, C) -> codes (B, T, n_q)."""
        codes = self.rvq_first.encode(x, min(n_q, self.n_sem))
        if n_q > self.n_sem:
            codes = torch.cat([codes, self.rvq_rest.encode(x, n_q - self.n_sem)], dim=-1)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, K) -> (B, T, C)."""
        y = self.rvq_first.decode(codes[..., : self.n_sem])
        if codes.shape[-1] > self.n_sem:
            y = y + self.rvq_rest.decode(codes[..., self.n_sem :])
        return y


# --------------------------------------------------------------------------------------------
# 4. The codec
# --------------------------------------------------------------------------------------------


class Mimi(nn.Module):
    """The Mimi codec. Offline: `encode`/`decode`; streaming: `streaming_encoder/decoder`."""

    def __init__(self, config: MimiConfig, num_codebooks: int = 8):
        super().__init__()
        c = config.validate()
        if not 1 <= num_codebooks <= c.total_codebooks:
            raise ValueError(
                f"num_codebooks must be in 1..{c.total_codebooks}, got {num_codebooks}"
            )
        self.config = c
        self.num_codebooks = num_codebooks
        self.encoder = SEANetEncoder(c)
        self.decoder = SEANetDecoder(c)
        self.encoder_transformer = Transformer(c)
        self.decoder_transformer = Transformer(c)
        self.quantizer = SplitRVQ(c)
        self.downsample = Downsample(c.dimension, c.resample_stride)
        self.upsample = Upsample(c.dimension, c.resample_stride)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def config_name(self) -> str:
        return self.config.name

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_size(self) -> int:
        return self.config.frame_size

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def cardinality(self) -> int:
        return self.config.bins

    @property
    def device(self) -> torch.device:
        return self.quantizer.rvq_first.input_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quantizer.rvq_first.input_proj.weight.dtype

    # -- state ---------------------------------------------------------------------------------
    def encoder_state(self, n: int) -> list[torch.Tensor]:
        d, t = self.device, self.dtype
        return _init_seq(self.encoder, n, d, t) + _init_seq(self.downsample, n, d, t)

    def decoder_state(self, n: int) -> list[torch.Tensor]:
        d, t = self.device, self.dtype
        return _init_seq(self.upsample, n, d, t) + _init_seq(self.decoder, n, d, t)

    # -- shared forward passes (offline: cache None, fresh states) -----------------------------
    def encode_frames(self, pcm, states: ConvStates, cache, active) -> torch.Tensor:
        """pcm (N, 1, T) -> codes (N, K, T / frame_size)."""
        x = self.encoder(pcm.transpose(1, 2), states)  # (N, 2F, C) at 25 Hz
        x = self.encoder_transformer(x, cache, active)
        x = self.downsample(x, states)  # (N, F, C) at 12.5 Hz
        return self.quantizer.encode(x, self.num_codebooks).transpose(1, 2)

    def decode_frames(self, codes, states: ConvStates, cache, active) -> torch.Tensor:
        """codes (N, K, F) -> pcm (N, 1, F * frame_size)."""
        x = self.quantizer.decode(codes.transpose(1, 2))  # (N, F, C)
        x = self.upsample(x, states)  # (N, 2F, C)
        x = self.decoder_transformer(x, cache, active)
        return self.decoder(x, states).transpose(1, 2)

    # -- offline API ----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm float (B, 1, T) -> codes int64 (B, K, ceil(T / 1920)).

        T need not be a multiple of 1920: the end is zero-padded to whole frames, as the
        reference does.
        """
        check_pcm(pcm, offline=True)
        pad = (-pcm.shape[-1]) % self.frame_size
        x = F.pad(pcm.to(self.device, self.dtype), (0, pad))
        return self.encode_frames(x, ConvStates(self.encoder_state(x.shape[0])), None, None)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int (B, K, F) -> pcm (B, 1, F * 1920) in the model dtype."""
        check_codes(codes, self.num_codebooks, self.cardinality, offline=True)
        codes = codes.to(self.device, torch.long)
        return self.decode_frames(codes, ConvStates(self.decoder_state(codes.shape[0])), None, None)

    # -- streaming API ---------------------------------------------------------------------------
    def streaming_encoder(self, num_rows: int) -> MimiStreamingEncoder:
        """State for `num_rows` streams, one frame of pcm each per step (mimi_streaming.py)."""
        from moshi_grpc.models.mimi_streaming import MimiStreamingEncoder

        return MimiStreamingEncoder(self, num_rows)

    def streaming_decoder(self, num_rows: int) -> MimiStreamingDecoder:
        """State for `num_rows` streams, one frame of codes each per step."""
        from moshi_grpc.models.mimi_streaming import MimiStreamingDecoder

        return MimiStreamingDecoder(self, num_rows)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _random_init(mimi: Mimi, seed: int) -> None:
    """Seeded, untrained weights with sane scales (codebooks spread like the latents)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mimi.named_parameters():
            if name.endswith(".scale"):
                continue
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(fan_in, 1)))
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            for layer in rvq.vq.layers:
                cb = layer._codebook
                cb.cluster_usage.copy_(0.5 + torch.rand(cb.cluster_usage.shape, generator=gen))
                cb.embedding_sum.copy_(
                    torch.randn(cb.embedding_sum.shape, generator=gen) * cb.cluster_usage[:, None]
                )


def load_mimi(
    weights: str | Path | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_codebooks: int = 8,
    config: str | MimiConfig = "mimi",
    seed: int = 0,
) -> Mimi:
    """Build the codec and load weights strictly: the official names with either attention
    layout (the published fused `in_proj_weight`, or the reference's modules' `in_projs.0`,
    see `fold_attention_layouts`), or the transformers layout.

    `weights=None` gives seeded random weights: an untrained codec, for tests and demos only.
    """
    cfg = _resolve_config(config)
    mimi = Mimi(cfg, num_codebooks=num_codebooks)
    if weights is None:
        logger.warning(
            "Mimi %r has RANDOM, UNTRAINED weights (seed %d): its audio is noise. "
            "Pass the real checkpoint for a working codec.", cfg.name, seed,
        )  # fmt: skip
        _random_init(mimi, seed)
    else:
        tensors = read_safetensors(weights)
        if is_hf_layout(tensors):
            tensors = hf_to_official(tensors, cfg)
        tensors = fold_attention_layouts(tensors, source=str(weights))
        load_state_strict(mimi, tensors, source=str(weights))
    # codebooks stay float32 whatever the model dtype: nearest-centroid search needs it
    books = {n: b.float().clone() for n, b in mimi.named_buffers() if "._codebook." in n}
    mimi = mimi.to(device=device, dtype=dtype).eval()
    for name, buf in books.items():
        owner, attr = name.rsplit(".", 1)
        setattr(mimi.get_submodule(owner), attr, buf.to(device))
    for p in mimi.parameters():
        p.requires_grad_(False)
    return mimi


def save_mimi(mimi: Mimi, path: str | Path) -> None:
    """Write the weights with the official tensor names (a file `load_mimi` reads back)."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in mimi.state_dict().items()}
    save_file(state, str(path))
