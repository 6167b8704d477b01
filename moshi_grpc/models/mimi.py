"""Mimi, the neural audio codec of Moshi, in one file: 24 kHz mono audio <-> 12.5 Hz RVQ codes.

Read top to bottom:

1. `MimiConfig` and its presets (`"mimi"` is the published 79 M model, `"tiny"` a small one
   for tests and demos).
2. Building blocks. Every causal convolution keeps, per batch slot, the few input columns
   that the next call needs (its left context); a transposed convolution, computed as a
   causal conv over input steps, keeps the last input step. The offline path is the same code
   run once over the whole signal from a fresh (zero) state, so streaming equals offline
   by construction.
3. The SEANet encoder/decoder, the two transformers (RoPE, context 250 steps at 25 Hz,
   layer scale), the learned down/upsampling 25 Hz <-> 12.5 Hz and the split RVQ.
4. `Mimi` (offline `encode`/`decode`), `MimiStreamingEncoder`/`MimiStreamingDecoder`
   (one 80 ms frame per row per call over a row prefix, per-row reset, move and masks)
   and `load_mimi`.

Module and parameter names reproduce the official checkpoint's tensor names
(`tokenizer-e351c8d8-checkpoint125.safetensors`), so loading is a strict, name-for-name copy;
the Hugging Face `MimiModel` layout is converted to those names first.

Streaming state: every tensor has the row (a stream's place) as its first dimension, and a
step runs on a row prefix [0, B) of the preallocated rows (a replica steps only the bucket
that holds its live streams). All state is written in place: conv caches copied in at the
end of a step (`torch.where(active, new, old)` for masked rows), the transformer KV caches
are ring buffers written at per-row positions (see `KVCache` for inactive rows), so a
captured CUDA graph replays the same addresses. No Python branch looks at per-row values
and nothing waits on the device inside a step, except the RVQ's choice between two
searches that give the same codes (`_FastSearch`, CPU only; `Mimi.use_fast_search`).

Exactness note: the attention of a query at step p sees steps p-249..p (context 250). A
streaming frame brings two 25 Hz steps at once, so the ring holds context + 1 steps; the
public reference keeps only 250 and its first query of a frame then misses one step once a
stream is longer than 10 s (its streaming output drifts from its own offline output there).
We follow the offline definition, so our streaming equals our offline path at any length.

Speed (CPU): convolutions run as matmuls against pre-laid-out weights, in a time-major
(N, T, C) layout: on the long 24 kHz side the input read as blocks of `stride` steps times
every kernel block's weight at once, summed shifted (no copy of the input); on the 25 Hz
side im2col (one strided view) + one matmul. Transposed convolutions are causal convs over
pairs of input steps with `stride x Cout` outputs per step (one matmul, no overlap-add).
That avoids oneDNN's per-call weight re-layout and PyTorch's slow
transposed-conv fallback, which dominate the reference at one frame per call. Activations
that only the next layer reads are overwritten in place (ELU, residual adds). At batch 1 a
frame is memory-bound (~170 MB of weights read for a few rows of activations), so in
float32 on CPU every conv, transformer and projection weight is also blocked once for
oneDNN's inner product (`_pack`, rebuilt by `refresh()`; ~+330 MB resident for the "mimi"
config), which streams it faster than MKL's sgemm, except for one or two rows (batch 1 on
the 25 Hz side), where MKL's w @ x.T is faster (`_rows_linear`, `_prefers_rows`), for weights wider
than 1024 inputs in 1024-column blocks (`_column_blocks`; +126 MB of copies);
elsewhere (other dtypes or devices, builds without oneDNN) `_rows_linear` takes over.
The RVQ search must round like torch.cdist (the reference); its slow matrix-vector kernel
is replaced by a faster one wherever a float error bound proves that the reference's
rounding picks the same centroid, and rerun exactly elsewhere (`_FastSearch`; +4 MB per
codebook used). Streaming attention (two queries per slot against the ring) is written out
in a few small ops, with the values held transposed (`KVCache`); RoPE, masks and ring
indices are computed once per transformer call, not per layer. Offline `encode`/`decode`
use the same code on the whole signal, so their memory grows linearly with its length.

Precision: float32 is the exact path (codes identical to the reference, pcm within 1e-4).
bfloat16/float16 run end to end, with codebooks, distances and RoPE in float32; their codes
follow float32 only where residual centroids are not near ties (deep RVQ levels diverge
first) and, in half precision, streaming is not bit-equal to offline. On the tiny fixture:
bf16 decode relative error ~3e-3, fp16 ~4e-4; semantic codebook agreement 83% / 100%.
CUDA paths are written device-agnostic but were not run here (no GPU in this environment).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moshi_grpc.models.checkpoint import (
    CheckpointError,
    fold_attention_layouts,
    load_state_strict,
    read_safetensors,
)
from moshi_grpc.models.rope import rope_angles

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Mimi",
    "MimiConfig",
    "MimiInputError",
    "MimiStreamingDecoder",
    "MimiStreamingEncoder",
    "hf_to_official",
    "load_mimi",
    "official_to_hf",
    "save_mimi",
]


_NOT_REFRESHED = (
    "this Mimi was built directly and its derived weight layouts are missing: call "
    ".refresh() after setting its weights (load_mimi does both)"
)


class MimiInputError(ValueError):
    """Audio or codes given to the codec have the wrong shape, dtype, length or values."""


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


def _rows_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    blocks: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """`F.linear(x, w, bias)` computed as w @ x.T with w (out, in) row-major.

    At one frame per call a layer sees one or two rows per slot; CPU BLAS then streams the
    weight once without packing it, about twice as fast as x @ w.T (which packs the large
    operand on every call). The fallback of `_linear` where oneDNN is not available.
    `blocks`: w as `_column_blocks`, partial products summed; MKL streams wide weights
    against two rows faster in blocks of 1024 columns than whole (the batch-1 feed-forward
    output and the 25 Hz side's 2048-8192-input convs: 1.2-1.4x between the other ops of a
    step, and faster than oneDNN's packed kernel there). Views of the columns instead of
    copies are slower than either.
    """
    blocks = blocks or (w,)
    x2, k = _rows_t(x), blocks[0].shape[1]
    first = x2[:k]
    y = (
        torch.mm(blocks[0], first)
        if bias is None
        else torch.addmm(bias.unsqueeze(1), blocks[0], first)
    )
    for i, b in enumerate(blocks[1:], 1):
        y = torch.addmm(y, b, x2[i * k : i * k + b.shape[1]])
    return _rows_out(y, x)


def _rows_t(x: torch.Tensor) -> torch.Tensor:
    """x's rows as the right operand of w @ x^T: the transposed view of row-major rows (MKL's
    kernel for a row-major (in, 2) operand is several times slower; the attention output
    arrives so), one row doubled (MKL's one-column kernel is ~2x slower than two columns)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 1:
        return torch.cat([x2, x2]).t()
    return x2.contiguous().t()


def _rows_out(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(out, columns) product of `_rows_t(x)` -> x's leading shape + (out,)."""
    return y.t()[: x.numel() // x.shape[-1]].reshape(*x.shape[:-1], y.shape[0])


def _column_blocks(w: torch.Tensor, width: int = 1024) -> tuple[torch.Tensor, ...]:
    """Contiguous copies of w's column blocks, for `_rows_linear`; () when w is not
    wider than `width` or is not a float32 CPU weight."""
    if w.shape[1] <= width or w.device.type != "cpu" or w.dtype != torch.float32:
        return ()
    return tuple(w[:, i : i + width].detach().contiguous() for i in range(0, w.shape[1], width))


def _pack(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's pre-blocked copy of a float32 CPU weight (out, in), or None where unavailable.

    At batch 1 a streaming frame is memory-bound: ~170 MB of weights are read for a few rows
    of activations. A weight blocked once for oneDNN's inner-product kernel streams at close
    to memory bandwidth (about 2x MKL's sgemm on two rows, which re-packs every call).
    """
    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.enabled:
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 2)
        torch.ops.mkldnn._linear_pointwise(w.new_zeros(1, w.shape[1]), packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):  # build without oneDNN
        return None
    return packed


def _prefers_rows(x: torch.Tensor, w: torch.Tensor, blocks: tuple = ()) -> bool:
    """One or two rows (a batch-1 streaming frame on the 25 Hz side and in the RVQ's
    projections) against a weight with at most 1024 inputs or at least as many outputs as
    inputs, or held as column blocks: MKL's sgemm as w @ x.T (in blocks; one row doubled,
    see `_rows_t`) streams these 1.2-1.5x faster than oneDNN's packed kernel between the
    other ops of a step (2 threads, measured here; in isolation the packed kernel wins for
    the wide ones). More rows: the packed kernel is as fast or up to 2x faster."""
    return x.numel() <= 2 * x.shape[-1] and (
        bool(blocks) or w.shape[1] <= 1024 or w.shape[0] >= w.shape[1]
    )


def _linear(
    x: torch.Tensor,
    w: torch.Tensor,
    packed: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    few_rows: bool = True,
    blocks: tuple[torch.Tensor, ...] = (),
    rows_form: bool = True,
) -> torch.Tensor:
    """`F.linear(x, w, bias)` through the packed weight when there is one (see `_pack`);
    otherwise as `_rows_linear` for layers that see few rows per frame, else plain.
    One exception, see `_prefers_rows` (`blocks`: w's `_column_blocks`, if kept), unless
    `rows_form` is off (`Mimi.use_rows_form`)."""
    if packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        if rows_form and _prefers_rows(x, w, blocks):
            return _rows_linear(x, w, bias, blocks)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return _rows_linear(x, w, bias) if few_rows else F.linear(x, w, bias)


class _States:
    """Reads the old per-slot conv states in order and collects the new ones."""

    def __init__(self, old: Sequence[torch.Tensor]):
        self._old = iter(old)
        self.new: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        return next(self._old)

    def give(self, t: torch.Tensor) -> None:
        self.new.append(t)


class _Holder(nn.Module):
    """Only there to reproduce the official nesting (`<name>.conv.conv.weight`)."""

    def __init__(self, attr: str, module: nn.Module):
        super().__init__()
        setattr(self, attr, module)


class StreamingConv1d(nn.Module):
    """Causal Conv1d on time-major activations (N, T, C), as matmuls on the input as it lies.

    The `context` input steps before each call come from the state: zeros at the start
    (constant padding), or the first sample repeated when `replicate` (the downsampler's
    padding). Matmuls against re-laid-out weights avoid the per-call weight re-layout that
    oneDNN convolutions pay on CPU, which dominates at one frame per call. Two forms:

    - shift-add, for the long 24 kHz-side layers: the input read as blocks of `stride` steps
      (a view) times the weight of every kernel block at once gives each block's partial
      sums; output t adds those of blocks t, t + 1, ... . No input is copied: unfolding a
      1920-step frame into (T, K * Cin) columns wrote 3-4x the input (12 MB per layer at
      batch 8), which cost as much as the matmul itself once the caches were cold.
    - unfold + one matmul (one strided view into (T, K * Cin) columns), where the partial
      sums would be larger than the columns (few input channels) or the layer sees only a
      couple of rows per frame (the 25 Hz side, where the copy is small and one matmul
      with fewer rows reads the large weight once).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        replicate: bool = False,
        few_rows: bool = False,
    ):
        super().__init__()
        self.conv = _Holder(
            "conv", nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, bias=bias)
        )
        self.few_rows = few_rows  # a streaming frame gives it ~2 rows per slot (25 Hz side)
        self.rows_form = True  # see `Mimi.use_rows_form`
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        self.span = (kernel - 1) * dilation + 1
        self.context = self.span - stride
        self.replicate = replicate
        # shift-add: kernel blocks of `stride` taps; 0 = unfold form (see the class doc)
        m = kernel // stride
        shiftable = kernel > 1 and kernel % stride == 0 and (stride == 1 or dilation == 1)
        self.blocks = m if shiftable and not few_rows and m * cout <= kernel * cin else 0
        # re-laid-out copy of the weight (and bias), rebuilt by `refresh()` after loading
        self.register_buffer("w_kc", torch.zeros(0), persistent=False)
        self.register_buffer("b_kc", None, persistent=False)
        self.packed: torch.Tensor | None = None
        self.w_blocks: tuple[torch.Tensor, ...] = ()  # see `_column_blocks` (25 Hz side)

    def refresh(self) -> None:
        w = self.conv.conv.weight  # (Cout, Cin, K)
        b = self.conv.conv.bias
        cout, cin, k = w.shape
        if self.blocks:  # (m * Cout, stride * Cin): rows (block, cout), columns (tap, cin)
            m, s = self.blocks, self.stride
            w = w.view(cout, cin, m, s).permute(2, 0, 3, 1).reshape(m * cout, s * cin)
            if b is not None:  # the bias goes with block 0; + 0.0 leaves the others exact
                b = torch.cat([b, b.new_zeros((m - 1) * cout)])
        else:  # (Cout, K * Cin): columns (tap, cin), as the unfolded input
            w = w.permute(0, 2, 1).reshape(cout, k * cin)
        self.w_kc = w.contiguous()
        self.b_kc = None if b is None else b.detach().contiguous()
        self.packed = _pack(self.w_kc)
        self.w_blocks = _column_blocks(self.w_kc) if self.few_rows else ()

    def init_state(self, n: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        if not self.context:
            return []
        cin = self.conv.conv.in_channels
        state = [torch.zeros(n, self.context, cin, device=device, dtype=dtype)]
        if self.replicate:
            state.append(torch.ones(n, device=device, dtype=torch.bool))  # "first call" flag
        return state

    def forward(self, x: torch.Tensor, states: _States) -> torch.Tensor:
        if self.context:
            prev = states.take()  # (N, context, Cin)
            if self.replicate:
                first = states.take()
                prev = torch.where(first.view(-1, 1, 1), x[:, :1], prev)
            x = torch.cat([prev, x], dim=1)
            states.give(x[:, -self.context :])
            if self.replicate:
                states.give(torch.zeros_like(first))
        if self.kernel == 1:
            return self._linear(x[:, :: self.stride])
        n, length, cin = x.shape
        s = self.stride
        if self.blocks:
            # z[:, b, j] = block b of the input times kernel block j; output t sums
            # z[:, t + j * shift, j] (shift: blocks between kernel blocks), from j = 0 up
            m, shift, nb = self.blocks, self.dilation if s == 1 else 1, length // s
            t = nb - (m - 1) * shift
            z = self._linear(x[:, : nb * s].reshape(n, nb, s * cin))
            if m == 1:  # kernel == stride: no overlap
                return z
            cout = z.shape[-1] // m
            y = z[:, :t, :cout] + z[:, shift : shift + t, cout : 2 * cout]
            for j in range(2, m):
                y += z[:, j * shift : j * shift + t, j * cout : (j + 1) * cout]
            return y
        # im2col as one strided view (N, Tout, K, Cin) of the contiguous (N, T, Cin) input;
        # the matmul copies its rows with contiguous channel runs, against (Cout, K * Cin)
        x = x.contiguous()
        t = (length - self.span) // s + 1
        cols = x.as_strided(
            (n, t, self.kernel, cin), (length * cin, s * cin, self.dilation * cin, 1)
        )
        return self._linear(cols.flatten(2))

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(
            x, self.w_kc, self.packed, self.b_kc, self.few_rows, self.w_blocks, self.rows_form
        )


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d (kernel = m * stride, m = 1 or 2) on (N, T, C).

    Output block b (`stride` samples) is input step b times the kernel's first `stride`
    taps plus step b - 1 times the rest. So it is computed as a causal conv over input
    steps (kernel m, one step of context kept as the state) with `stride * Cout` outputs
    per step: one matmul on (step b - 1, step b) pairs, an unfolded strided view, that
    writes every output once. Offline this is the reference's output with its incomplete
    tail dropped. Depthwise (groups == channels) is two elementwise products instead.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, bias=True,
        few_rows: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.few_rows = few_rows
        self.rows_form = True  # see `Mimi.use_rows_form`
        if kernel % stride or kernel > 2 * stride:
            raise ValueError("transposed conv kernel must be stride or 2 x stride")
        if groups not in (1, cin) or (groups > 1 and cout != cin):
            raise ValueError("only plain or depthwise transposed convolutions are supported")
        self.convtr = _Holder(
            "convtr", nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias)
        )
        self.stride, self.kernel, self.groups = stride, kernel, groups
        self.steps = kernel // stride  # input steps per output block: 1 or 2
        # re-laid-out copies of the weight and bias, rebuilt by `refresh()` after loading
        self.register_buffer("w_kc", torch.zeros(0), persistent=False)
        self.register_buffer("b_kc", None, persistent=False)
        self.packed: torch.Tensor | None = None
        self.w_blocks: tuple[torch.Tensor, ...] = ()  # see `_column_blocks` (25 Hz side)

    def refresh(self) -> None:
        w = self.convtr.convtr.weight  # (Cin, Cout / groups, K), tap k = j * stride + p
        b = self.convtr.convtr.bias
        cin, s, m = w.shape[0], self.stride, self.steps
        # (Cin, Cout', m, S) -> taps of the older step first, as a causal conv sees them
        w = w.view(cin, w.shape[1], m, s).flip(2)
        if self.groups == 1:  # (S * Cout, m * Cin): rows (p, cout), columns (step, cin)
            self.w_kc = w.permute(3, 1, 2, 0).reshape(s * w.shape[1], m * cin).contiguous()
            self.packed = _pack(self.w_kc)
            self.w_blocks = _column_blocks(self.w_kc) if self.few_rows else ()
        else:  # depthwise: (m, S, C)
            self.w_kc = w[:, 0].permute(1, 2, 0).contiguous()
        self.b_kc = None if b is None else b.detach().repeat(s).contiguous()  # (S * Cout,)

    def init_state(self, n: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        cin = self.convtr.convtr.in_channels
        return [torch.zeros(n, self.steps - 1, cin, device=device, dtype=dtype)]

    def forward(self, x: torch.Tensor, states: _States) -> torch.Tensor:
        n, t, cin = x.shape
        s, m = self.stride, self.steps
        cout = self.convtr.convtr.out_channels
        if m == 2:  # (step b - 1, step b) for every b, the first from the previous call
            x = torch.cat([states.take(), x], dim=1)
            states.give(x[:, -1:])
        else:
            states.give(states.take())  # (N, 0, Cin): nothing to carry
        if self.groups == 1:  # x is the contiguous cat result where m == 2
            pairs = x if m == 1 else x.as_strided((n, t, m * cin), ((t + 1) * cin, cin, 1))
            y = _linear(
                pairs, self.w_kc, self.packed, self.b_kc, self.few_rows, self.w_blocks,
                self.rows_form,
            )  # fmt: skip
        else:  # y[n, b, p, c] = sum_j x[n, b - (m - 1) + j, c] * w[c, 0, (m - 1 - j) * S + p]
            y = x[:, :t, None] * self.w_kc[0]
            for j in range(1, m):
                y = y + x[:, j : j + t, None] * self.w_kc[j]
            y = y.flatten(2)
            if self.b_kc is not None:
                y = y + self.b_kc
        return y.reshape(n, t * s, cout)


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

    def forward(self, x: torch.Tensor, states: _States) -> torch.Tensor:
        # direct .forward calls: see `_run_seq`
        y = self.convs[0].forward(F.elu(x), states)  # x is still needed: out of place
        y = self.convs[1].forward(F.elu(y, inplace=True), states)
        return y.add_(x)


def _run_seq(model: nn.Sequential, x: torch.Tensor, states: _States) -> torch.Tensor:
    """ELU in place: every layer's output is a fresh tensor read by nothing but the next
    layer; at batch 8 the activations are megabytes, and a fresh one per ELU costs
    bandwidth. Layers are stepped through `.forward` directly: these internal layers carry
    no hooks, and nn.Module.__call__ around ~50 convs per frame cost ~3% at batch 1."""
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
            last = i == len(c.ratios) - 1  # its output is at 25 Hz: 2 rows per frame
            layers += [nn.ELU(), StreamingConv1d(ch, ch * 2, ratio * 2, ratio, few_rows=last)]
            mult *= 2
        out = StreamingConv1d(mult * c.n_filters, c.dimension, c.last_kernel_size, few_rows=True)
        layers += [nn.ELU(), out]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, states: _States) -> torch.Tensor:
        return _run_seq(self.model, x, states)


class SEANetDecoder(nn.Module):
    """Latent (N, T, dimension) at 25 Hz -> audio (N, T * hop, 1) (time-major)."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        mult = 2 ** len(c.ratios)
        first = StreamingConv1d(c.dimension, mult * c.n_filters, c.kernel_size, few_rows=True)
        layers: list[nn.Module] = [first]
        for i, ratio in enumerate(c.ratios):
            ch = mult * c.n_filters
            tr = StreamingConvTranspose1d(ch, ch // 2, ratio * 2, ratio, few_rows=i == 0)
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

    def forward(self, x: torch.Tensor, states: _States) -> torch.Tensor:
        return _run_seq(self.model, x, states)


# --------------------------------------------------------------------------------------------
# 3. Transformer with per-slot ring KV cache
# --------------------------------------------------------------------------------------------


class KVCache:
    """Per-slot ring buffers for every layer of one transformer, plus per-slot positions.

    Keys are held as (N, H, capacity, hd) and values transposed, (N, H, hd, capacity): the
    values' product of a streaming step is then v^T @ p^T with the ring as the left
    operand, which CPU BLAS streams about twice as fast as p @ v for two queries per slot
    (that product was the slowest op of a batch-8 step).

    A row without a frame this call (masked) writes whatever its (zeroed) input gives into
    the ring entries at its position, as if it advanced, but its position stays. Those
    entries held steps older than the context (no query reads them any more), and the row's
    next real step overwrites them before its queries read the ring. So masking costs the cache
    nothing, and its buffers are not bit-for-bit what they were (its outputs are).
    """

    def __init__(
        self, layers: int, n: int, heads: int, capacity: int, head_dim: int, device, dtype
    ):
        self.capacity = capacity
        k_shape, vt_shape = (n, heads, capacity, head_dim), (n, heads, head_dim, capacity)
        self.k = [torch.zeros(k_shape, device=device, dtype=dtype) for _ in range(layers)]
        self.vt = [torch.zeros(vt_shape, device=device, dtype=dtype) for _ in range(layers)]
        self.pos = torch.zeros(n, device=device, dtype=torch.long)  # steps seen by each row
        self._views: dict[int, KVCache] = {}

    def make_views(self, n: int) -> None:
        """Make `rows(b)` for b = 1..n (once, before stepping)."""
        for b in range(1, n + 1):
            view = KVCache.__new__(KVCache)
            view.capacity, view._views = self.capacity, {}
            view.k, view.vt = [k[:b] for k in self.k], [v[:b] for v in self.vt]
            view.pos = self.pos[:b]
            self._views[b] = view

    def rows(self, b: int) -> KVCache:
        """The same buffers restricted to rows [0, b): views, so a step writes in place."""
        return self._views[b]

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Position 0 for `rows` (long indices). Ring entries older than the new position
        are masked out by `Transformer._plan`; no need to clear the buffers themselves."""
        self.pos.index_fill_(0, rows, 0)

    def move_row(self, src: int, dst: int) -> None:
        for t in (*self.k, *self.vt, self.pos):
            t[dst].copy_(t[src])


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))


@dataclass
class _StepPlan:
    """What every layer of one transformer call shares: RoPE, mask, ring write indices."""

    cos: torch.Tensor  # (2, B, 1, T, hd) float32, see `_rotate` (rows for q and k)
    sin: torch.Tensor
    mask: torch.Tensor  # (B, 1, T, S) bool: query t may see key s
    bias: torch.Tensor | None  # streaming float32: (B * H, T, S), the mask as 0 / -inf
    cache: KVCache | None
    write_k: torch.Tensor | None  # (B, H, T, hd) ring indices of the keys written this call
    write_v: torch.Tensor | None  # (B, H, hd, T) the same for the transposed values


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved (real, imaginary) pairs of the last dim, computed in float32.

    With `cos` = (c, c) and `sin` = (-s, s) per pair, x * cos + swap(x) * sin is
    (re c - im s, im c + re s): the same products and sums, so the same bits, as the
    rotation written per component, in 4 ops instead of ~15. q and k come out of one call.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    out = xf * cos + swapped * sin
    return out if x.dtype == torch.float32 else out.to(x.dtype)


class Attention(nn.Module):
    """Parameters of the causal multi-head self-attention (names as published); the
    computation is `TransformerLayer.forward` + `_attend`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.heads = heads


def _attend(qkv: torch.Tensor, plan: _StepPlan, layer: int) -> torch.Tensor:
    """Projected (3, B, H, T, hd) q, k, v -> (B, T, H * hd) head outputs (any strides)."""
    _, b, h, t, hd = qkv.shape
    qk = _rotate(qkv[:2], plan.cos, plan.sin)
    q, k, v = qk[0], qk[1], qkv[2]
    cache = plan.cache
    if cache is None:  # offline
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask)
        return y.transpose(1, 2).flatten(2)
    keys, values_t = cache.k[layer], cache.vt[layer]
    keys.scatter_(2, plan.write_k, k)  # inactive slots too, see `KVCache`
    values_t.scatter_(3, plan.write_v, v.mT)
    if plan.bias is None:  # half precision: the fused kernel
        y = F.scaled_dot_product_attention(q, keys, values_t.mT, attn_mask=plan.mask)
        return y.transpose(1, 2).flatten(2)
    # Streaming float32: a few queries per slot against the ring, written out: scores =
    # bias + q k^T (q carries 1/sqrt(hd), see `_plan`), then y^T = v^T p^T with the
    # probabilities passed transposed (as a row-major (T, S) block, the fast layout).
    cap = keys.shape[2]
    s = torch.baddbmm(plan.bias, q.reshape(b * h, t, hd), keys.view(b * h, cap, hd).mT)
    yt = torch.bmm(values_t.view(b * h, hd, cap), s.softmax(-1).mT)  # (B * H, hd, T)
    return yt.view(b, h * hd, t).mT


@dataclass(frozen=True)
class _LayerWeights:
    """One layer's tensors as plain references, gathered by `refresh()`: a streaming step
    reads them through one attribute instead of ~25 nn.Module lookups and 3 submodule
    calls per layer, which cost ~4% of a batch-1 frame."""

    norm1: tuple[torch.Tensor, torch.Tensor]
    norm2: tuple[torch.Tensor, torch.Tensor]
    scale1: torch.Tensor
    scale2: torch.Tensor
    w_in: torch.Tensor
    w_out: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    packed: tuple[torch.Tensor | None, ...]  # see `_pack`: in, out, 1, 2
    heads: int
    w2_blocks: tuple[torch.Tensor, ...]  # see `_column_blocks`; () where not used


class TransformerLayer(nn.Module):
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
        self.w: _LayerWeights | None = None  # set by `refresh()`
        self.rows_form = True  # see `Mimi.use_rows_form`

    def refresh(self) -> None:
        a = self.self_attn
        ws = (a.in_proj_weight, a.out_proj.weight, self.linear1.weight, self.linear2.weight)
        self.w = _LayerWeights(
            (self.norm1.weight, self.norm1.bias), (self.norm2.weight, self.norm2.bias),
            self.layer_scale_1.scale, self.layer_scale_2.scale, *ws,
            tuple(_pack(w) for w in ws), a.heads, _column_blocks(self.linear2.weight),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, plan: _StepPlan, i: int) -> torch.Tensor:
        w = self.w
        if w is None:
            raise RuntimeError(_NOT_REFRESHED)
        b, t, d = x.shape
        p_in, p_out, p_1, p_2 = w.packed
        rf = self.rows_form
        qkv = _linear(F.layer_norm(x, (d,), *w.norm1, 1e-5), w.w_in, p_in, rows_form=rf)
        qkv = qkv.view(b, t, 3, w.heads, d // w.heads).permute(2, 0, 3, 1, 4)
        x = x + w.scale1 * _linear(_attend(qkv, plan, i), w.w_out, p_out, rows_form=rf)
        y = F.layer_norm(x, (d,), *w.norm2, 1e-5)
        fused = p_1 is not None and y.device.type == "cpu" and y.dtype == torch.float32
        if fused and not (rf and _prefers_rows(y, w.w1)):
            # oneDNN applies the (exact, erf) GELU as it writes the output: same bits, one pass
            y = torch.ops.mkldnn._linear_pointwise(y, p_1, None, "gelu", [], "none")
        else:
            y = F.gelu(_linear(y, w.w1, p_1, rows_form=rf))
        return x + w.scale2 * _linear(y, w.w2, p_2, blocks=w.w2_blocks, rows_form=rf)


class _Layers(nn.Module):
    def __init__(self, c: MimiConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(c) for _ in range(c.num_layers))


class Transformer(nn.Module):
    """(N, T, C) -> (N, T, C); names `<prefix>.transformer.layers.<i>...` as published."""

    def __init__(self, c: MimiConfig):
        super().__init__()
        self.transformer = _Layers(c)
        self.c = c

    def new_cache(self, n: int, steps_per_call: int, device, dtype) -> KVCache:
        c = self.c
        return KVCache(
            c.num_layers, n, c.num_heads, c.context + steps_per_call - 1,
            c.dimension // c.num_heads, device, dtype,
        )  # fmt: skip

    def _plan(self, b: int, t: int, device, cache: KVCache | None) -> _StepPlan:
        c = self.c
        h, hd = c.num_heads, c.dimension // c.num_heads
        positions = (
            cache.pos if cache is not None else torch.zeros(b, dtype=torch.long, device=device)
        )
        angles = rope_angles(positions, t, hd, c.max_period).unsqueeze(1)  # (B, 1, T, hd/2)
        cos, sin = angles.cos(), angles.sin()
        # per (re, im) pair: cos (c, c), sin (-s, s) (see `_rotate`); rows for q and k
        cos2 = torch.stack([cos, cos], -1).flatten(-2)
        sin2 = torch.stack([-sin, sin], -1).flatten(-2)
        qpos = positions.view(-1, 1) + torch.arange(t, device=device)  # (B, T)
        write_k = write_v = None
        if cache is None:  # offline: the whole signal at once, from position 0
            kpos = qpos
        else:
            cap = cache.capacity
            if t > cap - c.context + 1:
                raise MimiInputError(f"a streaming call brings at most {cap - c.context + 1} steps")
            ring = (qpos % cap).view(b, 1, t, 1)
            write_k = ring.expand(b, h, t, hd)
            write_v = ring.view(b, 1, 1, t).expand(b, h, hd, t)
            last = qpos[:, -1:]  # (B, 1)
            j = torch.arange(cap, device=device)
            kpos = last - torch.remainder(last - j, cap)  # newest step held in ring slot j
        delta = qpos.unsqueeze(-1) - kpos.unsqueeze(1)  # (B, T, S)
        mask = ((kpos.unsqueeze(1) >= 0) & (delta >= 0) & (delta < c.context)).unsqueeze(1)
        bias = None
        q_scale = 1.0
        if cache is not None and self.transformer.layers[0].norm1.weight.dtype == torch.float32:
            # written-out attention (see `_attend`): the mask as a bias per head, and q
            # pre-scaled through its RoPE rows; hd = 64 makes the scale 1/8, exact in binary
            bias = torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
            bias = bias.expand(b, h, t, -1).reshape(b * h, t, -1)
            q_scale = hd**-0.5
        cos2 = torch.stack([cos2 * q_scale, cos2])
        sin2 = torch.stack([sin2 * q_scale, sin2])
        return _StepPlan(cos2, sin2, mask, bias, cache, write_k, write_v)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        plan = self._plan(b, t, x.device, cache)
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, plan, i)
        if cache is not None:
            step = torch.full_like(cache.pos, t)
            if active is not None:
                step = step * active
            cache.pos.add_(step)
        return x


# --------------------------------------------------------------------------------------------
# 3b. Resampling 25 Hz <-> 12.5 Hz and the split RVQ
# --------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    """Learned strided conv (kernel 2 * stride, no bias, left padding = first sample)."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = StreamingConv1d(
            dim, dim, 2 * stride, stride, bias=False, replicate=True, few_rows=True
        )

    def forward(self, x: torch.Tensor, states: _States) -> torch.Tensor:
        return self.conv(x, states)


class Upsample(nn.Module):
    """Depthwise transposed conv (kernel 2 * stride, no bias)."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.convtr = StreamingConvTranspose1d(dim, dim, 2 * stride, stride, groups=dim, bias=False)

    def forward(self, x: torch.Tensor, states: _States) -> torch.Tensor:
        return self.convtr(x, states)


class Codebook(nn.Module):
    """Published as EMA sums and usage counts; the centroids are their ratio."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))

    def centroids(self) -> torch.Tensor:
        return self.embedding_sum.float() / self.cluster_usage.float().clamp(min=1e-5)[:, None]


class _VQ(nn.Module):
    def __init__(self, bins: int, dim: int):
        super().__init__()
        self._codebook = Codebook(bins, dim)


class _VQLayers(nn.Module):
    def __init__(self, n: int, bins: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(_VQ(bins, dim) for _ in range(n))


class _FastSearch:
    """Nearest-centroid search that returns the exact path's codes, ~2x cheaper per frame.

    The exact path must round like the reference's torch.cdist (MKL, a matrix-vector
    kernel that streams each 2 MB codebook slowly). Here scores s_j = r.e_j - |e_j|^2 / 2
    (ranked like the distances) come from a faster kernel: for one or two rows, the
    codebook as the left operand of MKL's sgemm (`_rows_linear`, which MKL streams faster
    than any one-row kernel here), oneDNN's packed copy for more. Rounding differs, but
    any float32 dot product of n terms lies within n 2^-24 sum|terms| of its exact value
    whatever the summation order, and here sum|terms| <= (|r| + max|e|)^2 on both sides. So where the
    best score leads the runner-up by more than 2.5x that bound (2x for the worst case of
    both sides, plus room for the float32 norms and for the square root not to tie), the
    reference's kernel picks the same centroid. Levels are certified at the end of the
    call; from the first level where some row is closer than that, the caller reruns the
    exact path (its residual there is the same, bit for bit). With random weights that
    happened for ~1% of rows per level.
    """

    MAX_ROWS = 16  # streaming batches; offline calls have many rows, hence many reruns

    def __init__(self, packed: list, half_norms: torch.Tensor, max_norm: torch.Tensor):
        self.packed = packed
        self.neg_half_norms, self.max_norm = half_norms, max_norm  # (levels, bins), (levels,)

    @classmethod
    def build(cls, codebooks: torch.Tensor, levels: int | None) -> _FastSearch | None:
        cb = codebooks[: codebooks.shape[0] if levels is None else levels]
        if cb.device.type != "cpu" or cb.shape[0] == 0 or cb.shape[1] < 2:
            return None
        packed = [_pack(b) for b in cb]
        if any(p is None for p in packed):
            return None
        norms = cb.pow(2).sum(-1)
        return cls(packed, -0.5 * norms, norms.amax(1).sqrt())

    def applies(self, rows: torch.Tensor, n_q: int) -> bool:
        return (
            rows.device.type == "cpu" and rows.shape[0] <= self.MAX_ROWS and n_q <= len(self.packed)
        )

    def levels(self, r: torch.Tensor, start: int, n_q: int, codebooks: torch.Tensor):
        """Levels start.. of residual rows r (M, dim) -> (their codes as far as certified,
        the residual at the first uncertified level, or at the end)."""
        codes, tops, residuals = [], [], []
        rows = r.shape[0]
        for i in range(start, n_q):
            if rows <= 2:
                s = _rows_linear(r, codebooks[i], self.neg_half_norms[i])
            else:
                s = torch.ops.mkldnn._linear_pointwise(
                    r, self.packed[i], self.neg_half_norms[i], "none", [], ""
                )
            top = s.topk(2, dim=-1)  # (M, 2): best and runner-up
            codes.append(top.indices[:, 0])
            tops.append(top.values)
            residuals.append(r)
            if i + 1 < n_q:
                r = r - codebooks[i][codes[-1]]
        top2 = torch.stack(tops)  # (levels, M, 2)
        norm = torch.stack(residuals).pow(2).sum(-1).sqrt_()  # (levels, M)
        bound = (norm + self.max_norm[start:n_q, None]).square_()
        bound = bound.mul_(5 * (r.shape[1] + 2) * 2.0**-24)
        sure = (2 * (top2[..., 0] - top2[..., 1]) > bound).all(dim=1)
        good = len(codes) if bool(sure.all()) else int(sure.long().argmin())
        return codes[:good], residuals[good] if good < len(codes) else r


class ResidualVQ(nn.Module):
    """Projection in (1x1 conv) -> residual VQ -> projection out."""

    def __init__(self, n_q: int, bins: int, dim: int, io_dim: int):
        super().__init__()
        self.input_proj = nn.Conv1d(io_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, io_dim, 1, bias=False)
        self.vq = _VQLayers(n_q, bins, dim)
        self.register_buffer("codebooks", torch.zeros(n_q, bins, dim), persistent=False)
        self.register_buffer("padded", torch.zeros(n_q, bins, dim + 2), persistent=False)
        self.register_buffer("w_in", torch.zeros(0), persistent=False)
        self.register_buffer("w_out", torch.zeros(0), persistent=False)
        self.packed_in: torch.Tensor | None = None
        self.packed_out: torch.Tensor | None = None
        self.search: _FastSearch | None = None
        self.fast_search = True  # see `Mimi.use_fast_search`
        self.rows_form = True  # see `Mimi.use_rows_form`
        self.exact_reruns = 0  # levels recomputed by the exact path after a near-tie

    def refresh(self, levels: int | None = None) -> None:
        """Recompute the float32 centroids after the EMA buffers changed (load).

        `levels`: how many codebooks encoding and decoding will use (None: all). Only those
        get centroid tables (4 MB each with the exact path's padded copy; 8 of 32 codebooks
        leave ~100 MB of the acoustic ones unbuilt).
        """
        layers = self.vq.layers if levels is None else self.vq.layers[:levels]
        centroids = [layer._codebook.centroids() for layer in layers]
        shape = self.vq.layers[0]._codebook.embedding_sum.shape  # (bins, dim)
        cb = torch.stack(centroids) if centroids else torch.zeros(0, *shape)
        norms = cb.pow(2).sum(-1, keepdim=True)
        device = self.codebooks.device
        self.codebooks = cb.to(device)
        self.padded = torch.cat([cb, torch.ones_like(norms), norms], -1).to(device)
        self.w_in = self.input_proj.weight[:, :, 0].contiguous()
        self.w_out = self.output_proj.weight[:, :, 0].contiguous()
        self.packed_in = _pack(self.w_in)
        self.packed_out = _pack(self.w_out)
        self.search = _FastSearch.build(self.codebooks, levels)

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        """x (B, T, io_dim) -> codes (B, T, n_q): nearest centroid of the running residual."""
        r = _linear(x, self.w_in, self.packed_in, rows_form=self.rows_form).float()  # (B, T, dim)
        r = r.reshape(-1, r.shape[-1])
        fast = self.fast_search and self.search is not None and self.search.applies(r, n_q)
        codes: list[torch.Tensor] = []
        while len(codes) < n_q:
            if fast:  # as many levels as it can vouch for, then one exact level
                got, r = self.search.levels(r, len(codes), n_q, self.codebooks)
                codes += got
                if len(codes) == n_q:
                    break
                self.exact_reruns += 1
            i = len(codes)
            # Euclidean distance as torch.cdist computes it (what the reference calls):
            # [-2r, |r|^2, 1] . [e, 1, |e|^2] in one matmul, clamped, square-rooted; same
            # rounding, so near-ties in deep residual levels resolve the same way.
            rf = r.unsqueeze(0)
            rn = rf.pow(2).sum(-1, keepdim=True)
            lhs = torch.cat([rf.mul(-2), rn, torch.ones_like(rn)], dim=-1)
            dist = lhs.matmul(self.padded[i].unsqueeze(0).mT).clamp_min_(0).sqrt_()
            codes.append(dist[0].argmin(-1))
            if i + 1 < n_q:
                r = r - self.codebooks[i][codes[-1]]
        return torch.stack(codes, dim=-1).view(*x.shape[:-1], n_q)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T, n_q) -> (B, T, io_dim)."""
        q = self.codebooks[0][codes[..., 0]]
        for i in range(1, codes.shape[-1]):
            q = q + self.codebooks[i][codes[..., i]]
        return _linear(
            q.to(self.w_out.dtype), self.w_out, self.packed_out, rows_form=self.rows_form
        )


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

    def refresh(self) -> None:
        """Rebuild derived tensors (centroids, weight layouts) after the weights changed.

        `load_mimi` calls it; call it again after editing parameters or buffers by hand.
        """
        n_sem = self.config.semantic_codebooks
        self.quantizer.rvq_first.refresh(min(self.num_codebooks, n_sem))
        self.quantizer.rvq_rest.refresh(max(self.num_codebooks - n_sem, 0))
        for m in self.modules():
            if isinstance(m, (StreamingConv1d, StreamingConvTranspose1d)):
                m.refresh()
        with torch.no_grad():  # same values and names, row-major storage (`_rows_linear`)
            for name, p in self.named_parameters():
                if (
                    name.startswith(("encoder_transformer.", "decoder_transformer."))
                    and p.dim() == 2
                ):
                    p.data = p.data.contiguous()
        for t in (self.encoder_transformer, self.decoder_transformer):
            for layer in t.transformer.layers:
                layer.refresh()

    def use_fast_search(self, enabled: bool) -> None:
        """Whether the RVQ search takes the certified fast kernel where it applies (CPU,
        float32; on by default). Its choice to rerun a level exactly is a host branch on
        tensor values, so a step with it cannot be traced as one graph; without it every
        level runs the exact path: the same codes, about twice the search time."""
        self.quantizer.rvq_first.fast_search = enabled
        self.quantizer.rvq_rest.fast_search = enabled

    def use_rows_form(self, enabled: bool) -> None:
        """Whether float32 CPU layers that see one or two rows (batch 1 on the 25 Hz side)
        take MKL's w @ x.T form instead of oneDNN's packed kernel (`_prefers_rows`; on by
        default). Tuned on an AMD EPYC, where it was 1.2-1.5x faster for those layers. On
        an Intel Xeon with AMX (2 cores) the packed kernel alone made a batch-1 frame ~25%
        faster (encode 33.1 -> 24.6 ms, decode 30.1 -> 21.1 ms, 1 thread). Off, a stream's
        pcm is also bit-identical whatever the batch (with it, batch 1 rounds differently:
        ~5e-7 of full scale)."""
        for m in self.modules():
            if hasattr(m, "rows_form"):
                m.rows_form = enabled

    def _check_refreshed(self) -> None:
        if self.decoder_transformer.transformer.layers[0].w is None:
            raise RuntimeError(_NOT_REFRESHED)

    # -- state ---------------------------------------------------------------------------------
    def _encoder_state(self, n: int) -> list[torch.Tensor]:
        d, t = self.device, self.dtype
        return _init_seq(self.encoder, n, d, t) + _init_seq(self.downsample, n, d, t)

    def _decoder_state(self, n: int) -> list[torch.Tensor]:
        d, t = self.device, self.dtype
        return _init_seq(self.upsample, n, d, t) + _init_seq(self.decoder, n, d, t)

    # -- shared forward passes (offline: cache None, fresh states) -----------------------------
    def _encode_frames(self, pcm, states: _States, cache, active) -> torch.Tensor:
        """pcm (N, 1, T) -> codes (N, K, T / frame_size)."""
        x = self.encoder(pcm.transpose(1, 2), states)  # (N, 2F, C) at 25 Hz
        x = self.encoder_transformer(x, cache, active)
        x = self.downsample(x, states)  # (N, F, C) at 12.5 Hz
        return self.quantizer.encode(x, self.num_codebooks).transpose(1, 2)

    def _decode_frames(self, codes, states: _States, cache, active) -> torch.Tensor:
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
        _check_pcm(pcm, self.frame_size, offline=True)
        self._check_refreshed()
        pad = (-pcm.shape[-1]) % self.frame_size
        x = F.pad(pcm.to(self.device, self.dtype), (0, pad))
        return self._encode_frames(x, _States(self._encoder_state(x.shape[0])), None, None)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int (B, K, F) -> pcm (B, 1, F * 1920) in the model dtype."""
        _check_codes(codes, self.num_codebooks, self.cardinality, ndim=3)
        self._check_refreshed()
        codes = codes.to(self.device, torch.long)
        return self._decode_frames(codes, _States(self._decoder_state(codes.shape[0])), None, None)

    # -- streaming API ---------------------------------------------------------------------------
    def streaming_encoder(self, num_slots: int) -> MimiStreamingEncoder:
        return MimiStreamingEncoder(self, num_slots)

    def streaming_decoder(self, num_slots: int) -> MimiStreamingDecoder:
        return MimiStreamingDecoder(self, num_slots)


class _Streamer:
    """Rows of streaming state shared by the encoder and decoder.

    `num_slots` rows are preallocated; a step runs on the row prefix [0, B) of them, for
    any B <= num_slots, and leaves rows >= B untouched (a replica steps only the bucket
    holding its live sessions, see services/common/buckets.py). Every state tensor (conv
    caches, KV rings, positions) is written in place, so a captured CUDA graph replays the
    same addresses. `step` checks its inputs, then runs `step_unchecked`, which makes no
    host synchronisation (no `.item()`, no branch on tensor values) except in the RVQ's
    fast CPU search (see `Mimi.use_fast_search`).
    """

    def __init__(self, mimi: Mimi, num_slots: int, transformer: Transformer, states):
        mimi._check_refreshed()
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.mimi, self.num_slots = mimi, num_slots
        with torch.inference_mode():
            self._fresh = states(num_slots)
            self._states = [s.clone() for s in self._fresh]
            self._cache = transformer.new_cache(
                num_slots, mimi.config.resample_stride, mimi.device, mimi.dtype
            )
            # every prefix's views made once: a step then looks them up (a traced step
            # guards on what it read, so nothing it reads may change between calls)
            self._views = {b: [s[:b] for s in self._states] for b in range(1, num_slots + 1)}
            self._cache.make_views(num_slots)

    def _rows(self, b: int) -> list[torch.Tensor]:
        """Every conv state restricted to rows [0, b) (views, written in place)."""
        return self._views[b]

    def _check_batch(self, x: torch.Tensor, what: str, row: str) -> int:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not 1 <= x.shape[0] <= self.num_slots:
            raise MimiInputError(
                f"{what} must have shape (B, {row}) with 1 <= B <= {self.num_slots}, "
                f"got {tuple(getattr(x, 'shape', ()))}"
            )
        return x.shape[0]

    def _active(self, active: torch.Tensor | None, b: int) -> torch.Tensor | None:
        if active is None:
            return None
        if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
            raise MimiInputError("active must be a bool tensor")
        if active.shape != (b,):
            raise MimiInputError(f"active must have shape ({b},), got {tuple(active.shape)}")
        if bool(active.all()):  # every row advances: the same as no mask, minus the masking
            return None
        return active.to(self.mimi.device)

    def _commit(self, b: int, new: list[torch.Tensor], active: torch.Tensor | None) -> None:
        """The step's new conv states into rows [0, b), in place (masked rows keep theirs)."""
        for old, n in zip(self._rows(b), new, strict=True):
            if active is not None:
                n = torch.where(active.view((-1,) + (1,) * (n.dim() - 1)), n, old)
            old.copy_(n)

    @torch.inference_mode()
    def reset_rows(self, rows: Sequence[int]) -> None:
        """Those rows start a fresh conversation; the others are untouched."""
        rows = list(rows)
        if any(not 0 <= int(r) < self.num_slots for r in rows):
            raise MimiInputError(f"rows must be in 0..{self.num_slots - 1}, got {rows}")
        if not rows:
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mimi.device)
        for s, f in zip(self._states, self._fresh, strict=True):
            s.index_copy_(0, idx, f.index_select(0, idx))
        self._cache.reset_rows(idx)

    @torch.inference_mode()
    def move_row(self, src: int, dst: int) -> None:
        """Row `src`'s whole state (conv caches, KV rings, position) copied into row `dst`."""
        for r in (src, dst):
            if not 0 <= r < self.num_slots:
                raise MimiInputError(f"rows must be in 0..{self.num_slots - 1}, got {r}")
        if src == dst:
            return
        for s in self._states:
            s[dst].copy_(s[src])
        self._cache.move_row(src, dst)

    def reset(self, slots: torch.Tensor | Sequence[int]) -> None:
        """Those rows (indices or a (num_slots,) bool mask) start a fresh conversation."""
        mask = _slot_mask(slots, self.num_slots)
        self.reset_rows(mask.nonzero().flatten().tolist())

    @property
    def positions(self) -> torch.Tensor:
        """Frames processed by each row since its last reset."""
        return self._cache.pos // self.mimi.config.resample_stride


class MimiStreamingEncoder(_Streamer):
    """Many streams, one 80 ms frame each per `step`, batched: stream i = row i."""

    def __init__(self, mimi: Mimi, num_slots: int):
        super().__init__(mimi, num_slots, mimi.encoder_transformer, mimi._encoder_state)

    @torch.inference_mode()
    def step(self, pcm: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """pcm (B, 1920) float -> codes (B, K) int64 for rows [0, B). Inactive rows: state
        kept, output unspecified. Rows >= B: untouched."""
        m = self.mimi
        b = self._check_batch(pcm, "pcm", str(m.frame_size))
        if pcm.shape[1] != m.frame_size:
            raise MimiInputError(
                f"pcm must have shape ({b}, {m.frame_size}), got {tuple(pcm.shape)}"
            )
        active = self._active(active, b)
        _check_pcm(pcm, m.frame_size, offline=False, active=active)
        return self.step_unchecked(pcm.to(m.device, m.dtype), active)

    def step_unchecked(self, pcm: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """`step` on checked inputs already on the model's device and dtype; `active` None
        (every row of the prefix advances) or a (B,) bool device tensor. No host
        synchronisation (capturable); call it under `torch.inference_mode()`."""
        b = pcm.shape[0]
        if active is not None:
            pcm = torch.where(active.view(-1, 1), pcm, torch.zeros_like(pcm))
        states = _States(self._rows(b))
        codes = self.mimi._encode_frames(pcm.unsqueeze(1), states, self._cache.rows(b), active)
        self._commit(b, states.new, active)
        return codes[:, :, 0]


class MimiStreamingDecoder(_Streamer):
    """Many streams, one frame of codes each per `step`, batched: stream i = row i."""

    def __init__(self, mimi: Mimi, num_slots: int):
        super().__init__(mimi, num_slots, mimi.decoder_transformer, mimi._decoder_state)

    @torch.inference_mode()
    def step(self, codes: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, K) int -> pcm (B, 1920) for rows [0, B). Inactive rows: state kept,
        output unspecified. Rows >= B: untouched."""
        m = self.mimi
        b = self._check_batch(codes, "codes", str(m.num_codebooks))
        active = self._active(active, b)
        _check_codes(codes, m.num_codebooks, m.cardinality, ndim=2, active=active)
        return self.step_unchecked(codes.to(m.device, torch.long), active)

    def step_unchecked(self, codes: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """`step` on checked int64 codes already on the model's device; `active` as in
        `MimiStreamingEncoder.step_unchecked`. Capturable."""
        b = codes.shape[0]
        if active is not None:
            codes = torch.where(active.view(-1, 1), codes, torch.zeros_like(codes))
        states = _States(self._rows(b))
        pcm = self.mimi._decode_frames(codes.unsqueeze(-1), states, self._cache.rows(b), active)
        self._commit(b, states.new, active)
        return pcm[:, 0]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _slot_mask(slots: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    if isinstance(slots, torch.Tensor) and slots.dtype == torch.bool:
        if slots.shape != (n,):
            raise MimiInputError(f"slot mask must have shape ({n},), got {tuple(slots.shape)}")
        return slots
    idx = torch.as_tensor(list(slots) if not isinstance(slots, torch.Tensor) else slots)
    if idx.numel() and (idx.dtype.is_floating_point or idx.min() < 0 or idx.max() >= n):
        raise MimiInputError(f"slot indices must be integers in 0..{n - 1}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx.long()] = True
    return mask


def _check_pcm(pcm, frame_size: int, offline: bool, active: torch.Tensor | None = None) -> None:
    if not isinstance(pcm, torch.Tensor) or not pcm.dtype.is_floating_point:
        raise MimiInputError(f"pcm must be a float tensor, got {getattr(pcm, 'dtype', type(pcm))}")
    if offline:
        if pcm.dim() != 3 or pcm.shape[1] != 1:
            raise MimiInputError(f"pcm must have shape (B, 1, T), got {tuple(pcm.shape)}")
        if pcm.shape[-1] == 0 or pcm.shape[0] == 0:
            raise MimiInputError("pcm is empty")
    finite = torch.isfinite(pcm).flatten(1).all(dim=1)
    if active is not None:
        finite = finite | ~active.to(finite.device)
    if not bool(finite.all()):
        raise MimiInputError("pcm contains NaN or Inf")


def _check_codes(codes, k: int, card: int, ndim: int, active: torch.Tensor | None = None) -> None:
    if (
        not isinstance(codes, torch.Tensor)
        or codes.dtype.is_floating_point
        or codes.dtype == torch.bool
    ):
        raise MimiInputError(
            f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}"
        )
    if codes.dim() != ndim:
        want = "(B, K, F)" if ndim == 3 else "(N, K)"
        raise MimiInputError(f"codes must have shape {want}, got {tuple(codes.shape)}")
    if codes.shape[1] != k:
        raise MimiInputError(f"expected {k} codebooks, got {codes.shape[1]}")
    if ndim == 3 and (codes.shape[-1] == 0 or codes.shape[0] == 0):
        raise MimiInputError("codes are empty")
    bad = ((codes < 0) | (codes >= card)).flatten(1).any(dim=1)
    if active is not None:
        bad = bad & active.to(bad.device)
    if bool(bad.any()):
        raise MimiInputError(f"codes out of range 0..{card - 1}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_HF_RENAMES = [
    # (Hugging Face transformers MimiModel name pattern, official name), applied in order
    (
        r"^(encoder|decoder)\.layers\.(\d+)\.block\.(\d+)\.conv\.",
        r"\1.model.\2.block.\3.conv.conv.",
    ),
    (r"^encoder\.layers\.(\d+)\.conv\.", r"encoder.model.\1.conv.conv."),
    (r"^downsample\.conv\.", "downsample.conv.conv.conv."),
    (r"^upsample\.conv\.", "upsample.convtr.convtr.convtr."),
    (r"^(encoder|decoder)_transformer\.layers\.", r"\1_transformer.transformer.layers."),
    (r"\.mlp\.fc1\.", ".linear1."),
    (r"\.mlp\.fc2\.", ".linear2."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.input_layernorm\.", ".norm1."),
    (r"\.post_attention_layernorm\.", ".norm2."),
    (r"\.self_attn_layer_scale\.", ".layer_scale_1."),
    (r"\.mlp_layer_scale\.", ".layer_scale_2."),
    (r"^quantizer\.semantic_residual_vector_quantizer\.layers\.", "quantizer.rvq_first.vq.layers."),
    (r"^quantizer\.semantic_residual_vector_quantizer\.", "quantizer.rvq_first."),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.layers\.", "quantizer.rvq_rest.vq.layers."),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.", "quantizer.rvq_rest."),
    (r"\.codebook\.initialized$", "._codebook._initialized"),
    (r"\.codebook\.embed_sum$", "._codebook.embedding_sum"),
    (r"\.codebook\.cluster_usage$", "._codebook.cluster_usage"),
]


def _is_hf_layout(tensors: dict[str, torch.Tensor]) -> bool:
    return any(
        k.startswith(("encoder.layers.", "quantizer.semantic_residual_vector_quantizer."))
        for k in tensors
    )


def hf_to_official(tensors: dict[str, torch.Tensor], config: MimiConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers `MimiModel` state dict to the official tensor names.

    transformers splits `in_proj_weight` into q/k/v and permutes q and k rows from
    interleaved to half-split RoPE; this undoes both.
    """
    h = config.num_heads
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.weight$", name)
        if m:
            qkv.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        new = name
        if re.match(r"^decoder\.layers\.\d+\.conv\.", new):
            new = re.sub(r"^decoder\.layers\.(\d+)\.conv\.", r"decoder.model.\1.CONV.", new)
        for pat, rep in _HF_RENAMES:
            new = re.sub(pat, rep, new)
        out[new] = t
    # decoder convs and transposed convs share the HF name `conv`; the official name depends
    # on the shape (transposed weights are (Cin, Cout, K) with an upsampling kernel)
    for name in [n for n in out if ".CONV." in n]:
        t = out.pop(name)
        idx = int(name.split(".")[2])
        kind = "convtr.convtr" if _decoder_is_convtr(config, idx) else "conv.conv"
        out[name.replace("CONV", kind)] = t
    for prefix, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            for p, t in parts.items():
                out[f"{prefix}.self_attn.{p}_proj.weight"] = t
            continue
        dim = parts["q"].shape[0]

        def unpermute(w: torch.Tensor, d=dim) -> torch.Tensor:
            return w.view(h, 2, d // h // 2, w.shape[1]).transpose(1, 2).reshape(d, w.shape[1])

        for pat, rep in _HF_RENAMES:
            prefix = re.sub(pat, rep, prefix)
        out[f"{prefix}.self_attn.in_proj_weight"] = torch.cat(
            [unpermute(parts["q"]), unpermute(parts["k"]), parts["v"]]
        )
    return out


def official_to_hf(tensors: dict[str, torch.Tensor], config: MimiConfig) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_official` (used by tests; follows the transformers converter)."""
    h = config.num_heads
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        new = name
        for a, b in [
            ("conv.conv.conv", "conv"), ("convtr.convtr.convtr", "conv"),
            ("conv.conv", "conv"), ("convtr.convtr", "conv"),
            ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
            ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
            ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
            ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
            ("_codebook", "codebook"), ("_initialized", "initialized"),
            ("embedding_sum", "embed_sum"), ("encoder.model", "encoder.layers"),
            ("decoder.model", "decoder.layers"),
            ("encoder_transformer.transformer", "encoder_transformer"),
            ("decoder_transformer.transformer", "decoder_transformer"),
            ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
            ("self_attn.out_proj", "self_attn.o_proj"), ("norm1", "input_layernorm"),
            ("norm2", "post_attention_layernorm"), ("layer_scale_1", "self_attn_layer_scale"),
            ("layer_scale_2", "mlp_layer_scale"),
        ]:  # fmt: skip
            new = new.replace(a, b)
        if new.endswith("in_proj_weight"):
            d = t.shape[0] // 3

            def permute(w: torch.Tensor, d=d) -> torch.Tensor:
                return w.view(h, d // h // 2, 2, w.shape[1]).transpose(1, 2).reshape(d, w.shape[1])

            base = new[: -len("in_proj_weight")]
            out[base + "q_proj.weight"] = permute(t[:d])
            out[base + "k_proj.weight"] = permute(t[d : 2 * d])
            out[base + "v_proj.weight"] = t[2 * d :]
        else:
            out[new] = t
    return out


def _decoder_is_convtr(config: MimiConfig, idx: int) -> bool:
    # decoder.model: 0 conv, then per ratio [ELU, convtr, resblocks...]
    pos = 1
    for _ in config.ratios:
        if idx == pos + 1:
            return True
        pos += 2 + config.n_residual_layers
    return False


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
        if _is_hf_layout(tensors):
            tensors = hf_to_official(tensors, cfg)
        tensors = fold_attention_layouts(tensors, source=str(weights))
        load_state_strict(mimi, tensors, source=str(weights))
    # codebooks stay float32 whatever the model dtype: nearest-centroid search needs it
    books = {n: b.float().clone() for n, b in mimi.named_buffers() if "._codebook." in n}
    mimi = mimi.to(device=device, dtype=dtype).eval()
    for name, buf in books.items():
        owner, attr = name.rsplit(".", 1)
        setattr(mimi.get_submodule(owner), attr, buf.to(device))
    mimi.refresh()
    for p in mimi.parameters():
        p.requires_grad_(False)
    return mimi


def save_mimi(mimi: Mimi, path: str | Path) -> None:
    """Write the weights with the official tensor names (a file `load_mimi` reads back)."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in mimi.state_dict().items()}
    save_file(state, str(path))
