"""Faster exact forms of the models' layers on CPU, applied from above.

The model files (`mimi.py`, `lm.py`) are the math in plain torch and never import this
module. The code that runs a model on CPU (the codec and LM engines, the benchmarks) calls
the `prepare_*` function of its model after loading it; that swaps a layer's plain
callables for forms that compute the same function with kernels that are faster on CPU
(pre-blocked oneDNN weights, BLAS-friendly operand layouts, certified shortcuts). Each form
is turned on only where a short measurement at load says it is faster on this machine (a
form tuned on one CPU can be slower on another), or as the caller forces it. A golden test
(tests/test_mimi_cpu_forms.py) shows that the forms equal the plain model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# --- Measuring: how every form is chosen ---

WIN_MARGIN = 0.03  # a form replaces the plain one only if it is at least this much faster


def _wins(form_ms: float, plain_ms: float) -> bool:
    """The one rule of every chooser here: a form must beat the plain computation by
    `WIN_MARGIN`, so that timing noise on a busy machine does not flip a choice (and a form
    holding a second copy of the weights is not kept for nothing)."""
    return form_ms < (1.0 - WIN_MARGIN) * plain_ms


def _form_names(spec: str, forms: tuple[str, ...], model: str) -> frozenset[str]:
    """The forms a comma-separated spec names, spelt with dashes ("conv-matmul") and returned
    as their field names ("conv_matmul"); an unknown name is an error."""
    names = {f.replace("_", "-"): f for f in forms}
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"unknown {model} CPU forms {unknown}; auto, on, off or of {list(names)}")
    return frozenset(names[n] for n in wanted)


def _best_ms(fn, reps: int) -> float:
    """Fastest of `reps` calls, in ms (the minimum is the figure least moved by a noisy
    machine); one untimed call first."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# --- Mimi forms ---
#
# mimi.py's seams (see its docstring) are methods that `prepare_mimi_for_cpu` shadows per
# instance (deleting the instance attribute restores the plain form):
# `StreamingConv1d.apply_conv`, `StreamingConvTranspose1d.apply_convtr`, the four matmuls
# of `TransformerLayer`, and `ResidualVQ.project_in/project_out/codebooks/quantize`.
#
# - conv-matmul: convolutions as matmuls on the time-major input against weights laid out
#   once. oneDNN's convolution re-lays its weight out on every call, which dominates at one
#   frame per call, and PyTorch's transposed convolution falls back to a slow kernel. Long
#   24 kHz-side layers take the shift-add form: the input read as blocks of `stride` steps
#   (a view) times the weight of every tap group at once; output t adds the partial sums of
#   blocks t, t + 1, ... . No input is copied (an unfolded 1920-step frame writes 3-4x the
#   input, which costs as much as the matmul once the caches are cold). Elsewhere (few
#   input channels, or the 25 Hz side, where one matmul on few rows reads a large weight
#   once) im2col as one strided view + one matmul. Transposed convolutions: one matmul on
#   (step b - 1, step b) pairs with stride x Cout outputs per step (no overlap-add);
#   depthwise ones two elementwise products.
# - onednn-packed: float32 weights blocked once for oneDNN's inner product, which streams
#   them faster than sgemm (that re-packs on every call); a frame at batch 1 is bound by
#   reading the weights. The feed-forward's GELU is fused into it. One more weight copy.
# - rows: one or two rows (batch 1 on the 25 Hz side) as w @ x.T with w row-major, wide
#   weights in 1024-column blocks (one more copy of those): BLAS then streams the weight
#   once without packing it.
# - fast-search: the certified nearest-centroid search (`_CertifiedSearch`). Its choice to
#   rerun a level exactly is a host branch on tensor values: a step with it cannot be
#   captured or traced as one graph.
# - codebook-tables: the centroids and the exact search's padded tables computed once,
#   not per call (less work whatever the machine: "auto" turns it on without measuring).

_MIMI_SEAMS = (
    "apply_conv", "apply_convtr", "in_proj", "out_proj", "feed_forward_in",
    "feed_forward_out", "project_in", "project_out", "codebooks", "quantize",
)  # fmt: skip


@dataclass(frozen=True)
class MimiForms:
    """Which of Mimi's CPU forms are on (see above)."""

    conv_matmul: bool = False
    onednn_packed: bool = False
    rows: bool = False
    fast_search: bool = False
    codebook_tables: bool = False

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def parse(cls, spec: str) -> str | MimiForms:
        """`auto`, `on` or `off` as they are; else comma-separated names of the forms to
        turn on (e.g. "conv-matmul,onednn-packed,fast-search")."""
        if spec in ("auto", "on", "off"):
            return spec
        wanted = _form_names(spec, tuple(f.name for f in fields(cls)), "Mimi")
        return cls(**dict.fromkeys(wanted, True))

    def __and__(self, other: MimiForms) -> MimiForms:
        both = {f.name: getattr(self, f.name) and getattr(other, f.name) for f in fields(self)}
        return MimiForms(**both)

    def __str__(self) -> str:
        return ", ".join(
            f"{f.name.replace('_', '-')} {'on' if getattr(self, f.name) else 'off'}"
            for f in fields(self)
        )


def prepare_mimi_for_cpu(
    mimi: nn.Module,
    forms: str | MimiForms = "auto",
    *,
    probe_batches: tuple[int, ...] = (1, 4),
    repeats: int = 3,
) -> MimiForms:
    """Apply Mimi's CPU forms to `mimi` (a `mimi.Mimi`) in place; which are on.

    `forms`: "auto" turns each form on only where it makes a streaming frame faster here,
    measured at load on `probe_batches` streams (greedily, one form at a time, best of
    `repeats`: some 40 frames, seconds for the published config); "on" every form that
    applies to the model's dtype; "off" none (the plain model); or an explicit `MimiForms`
    (limited to those that apply). Off CPU nothing applies: the plain model is what a CUDA graph
    captures. Call it again after changing weights or buffers (the forms hold copies).
    """
    if isinstance(forms, str) and forms not in ("auto", "on", "off"):
        raise ValueError(f"cpu forms mode must be auto, on or off, got {forms!r}")
    build = _MimiBuild()
    available = _mimi_forms_available(mimi)
    if forms == "off" or not available.any:
        chosen = MimiForms()
    elif forms == "on":
        chosen = available
    elif isinstance(forms, MimiForms):
        chosen = forms & available
    else:
        with torch.no_grad():
            chosen = _choose_mimi_forms(mimi, available, build, probe_batches, repeats)
    with torch.no_grad():
        _install_mimi_forms(mimi, chosen, build)
    mode = forms if isinstance(forms, str) else "explicit"
    logger.info("Mimi CPU forms (%s): %s", mode, chosen)
    return chosen


def mimi_exact_reruns(mimi: nn.Module) -> int:
    """Codebook levels the certified search handed back to the exact path (near-ties)."""
    return sum(getattr(m.__dict__.get("quantize"), "exact_reruns", 0) for m in mimi.modules())


def _mimi_forms_available(mimi: nn.Module) -> MimiForms:
    if mimi.device.type != "cpu":
        return MimiForms()
    packs = _pack_f32(torch.zeros(2, 2)) is not None  # a build with oneDNN's inner product
    f32 = mimi.dtype == torch.float32
    # the search runs on float32 residuals and codebooks whatever the model dtype
    return MimiForms(
        conv_matmul=True, onednn_packed=packs and f32, rows=True, fast_search=packs,
        codebook_tables=True,
    )  # fmt: skip


def _pack_f32(w: torch.Tensor) -> torch.Tensor | None:
    """`pack_weight` of a float32 weight, checked by one call (None where it fails);
    blocked for two rows: a streaming frame brings two 25 Hz steps per stream."""
    packed = pack_weight(w, rows=2) if w.dtype == torch.float32 else None
    if packed is None:
        return None
    try:
        packed_linear(w.new_zeros(1, w.shape[1]), packed)
    except (RuntimeError, NotImplementedError):
        return None
    return packed


def _rows_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    column_blocks: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """`F.linear(x, w, bias)` as w @ x.T, w (out, in) row-major, for one or two rows: BLAS
    streams the weight once without packing it (x @ w.T packs the large operand on every
    call). `column_blocks`: w as `_column_blocks`, partial products summed (wide weights
    stream faster in blocks against two rows; views of the columns instead of copies are
    slower)."""
    blocks = column_blocks or (w,)
    x2, k = _rows_t(x), blocks[0].shape[1]
    first = x2[:k]
    y = (
        torch.mm(blocks[0], first)
        if bias is None
        else torch.addmm(bias.unsqueeze(1), blocks[0], first)
    )
    for i, b in enumerate(blocks[1:], 1):
        y = torch.addmm(y, b, x2[i * k : i * k + b.shape[1]])
    return y.t()[: x.numel() // x.shape[-1]].reshape(*x.shape[:-1], y.shape[0])


def _rows_t(x: torch.Tensor) -> torch.Tensor:
    """x's rows as the right operand of w @ x^T: the transposed view of row-major rows (a
    row-major (in, 2) operand takes a much slower BLAS kernel; the attention output arrives
    so), one row doubled (the one-column kernel is slower than the two-column one)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 1:
        return torch.cat([x2, x2]).t()
    return x2.contiguous().t()


def _column_blocks(w: torch.Tensor, width: int = 1024) -> tuple[torch.Tensor, ...]:
    """Contiguous copies of w's 1024-column blocks for `_rows_linear`; () if w is not wider."""
    if w.shape[1] <= width:
        return ()
    return tuple(w[:, i : i + width].contiguous() for i in range(0, w.shape[1], width))


class _Linear:
    """`F.linear(x, w, bias)`, then the exact GELU with `gelu`: one or two rows by the rows
    form where it is on, else through oneDNN's packed weight where there is one, else
    F.linear. The choice reads shapes only (fixed per bucket: traceable)."""

    def __init__(self, w, bias, packed, rows: bool, column_blocks=(), gelu: bool = False):
        self.w, self.bias, self.packed, self.gelu = w, bias, packed, gelu
        self.column_blocks = column_blocks
        # a wide weight without column blocks streams better through the packed kernel
        self.rows = rows and (bool(column_blocks) or w.shape[1] <= 1024 or w.shape[0] >= w.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows and x.numel() <= 2 * x.shape[-1]:
            y = _rows_linear(x, self.w, self.bias, self.column_blocks)
        elif self.packed is not None and x.dtype == torch.float32:
            return packed_linear(x, self.packed, self.bias, self.gelu)
        else:
            y = F.linear(x, self.w, self.bias)
        return F.gelu(y) if self.gelu else y


class _MimiBuild:
    """Weight copies made for the forms, kept while forms are tried at load."""

    def __init__(self) -> None:
        self._made: dict[tuple, object] = {}

    def get(self, key: tuple, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def linear(self, key, w, bias, forms: MimiForms, *, wide_blocks: bool, gelu=False) -> _Linear:
        w = self.get(("w", *key), lambda: w.detach().contiguous())
        packed = self.get(("packed", *key), lambda: _pack_f32(w)) if forms.onednn_packed else None
        blocks = ()
        if forms.rows and wide_blocks:
            blocks = self.get(("blocks", *key), lambda: _column_blocks(w))
        return _Linear(w, bias, packed, forms.rows, blocks, gelu)


class _MatmulConv:
    """`StreamingConv1d.apply_conv` as matmuls (shift-add or im2col, see above)."""

    def __init__(self, layer: nn.Module, build: _MimiBuild, forms: MimiForms):
        w, b = layer.conv.conv.weight.detach(), layer.conv.conv.bias  # (Cout, Cin, K)
        cout, cin, k = w.shape
        s, d = layer.stride, layer.dilation
        m = k // s
        shiftable = k > 1 and k % s == 0 and (s == 1 or d == 1)
        # shift-add: the kernel as m groups of `stride` taps; 0: the im2col form
        self.tap_groups = m if shiftable and not layer.latent_rate and m * cout <= k * cin else 0
        self.kernel, self.stride, self.dilation, self.span = k, s, d, layer.span
        groups = self.tap_groups

        def matrix() -> tuple[torch.Tensor, torch.Tensor | None]:
            if groups:  # (m * Cout, stride * Cin): rows (group, cout), columns (tap, cin)
                w_mat = w.view(cout, cin, m, s).permute(2, 0, 3, 1).reshape(m * cout, s * cin)
                # the bias goes with group 0; + 0.0 leaves the others exact
                bias = None if b is None else torch.cat([b, b.new_zeros((m - 1) * cout)])
            else:  # (Cout, K * Cin): columns (tap, cin), as the unfolded input
                w_mat, bias = w.permute(0, 2, 1).reshape(cout, k * cin), b
            return w_mat.contiguous(), None if bias is None else bias.detach().contiguous()

        key = ("conv", id(layer))
        w_mat, bias = build.get(("matrix", *key), matrix)
        self.linear = build.linear(key, w_mat, bias, forms, wide_blocks=layer.latent_rate)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == 1:
            return self.linear(x[:, :: self.stride])
        n, length, cin = x.shape  # (N, context + T, Cin)
        s = self.stride
        if self.tap_groups:
            # z[:, b, j] = input block b times tap group j; output t sums z[:, t + j * shift, j]
            # (shift: blocks between tap groups), from j = 0 up
            m, shift, nb = self.tap_groups, self.dilation if s == 1 else 1, length // s
            t = nb - (m - 1) * shift
            z = self.linear(x[:, : nb * s].reshape(n, nb, s * cin))  # (N, nb, m * Cout)
            if m == 1:  # kernel == stride: no overlap
                return z
            cout = z.shape[-1] // m
            y = z[:, :t, :cout] + z[:, shift : shift + t, cout : 2 * cout]
            for j in range(2, m):
                y += z[:, j * shift : j * shift + t, j * cout : (j + 1) * cout]
            return y
        # im2col as one strided view (N, Tout, K, Cin) of the contiguous input; the matmul
        # reads its rows as contiguous channel runs, against (Cout, K * Cin)
        x = x.contiguous()
        t = (length - self.span) // s + 1
        cols = x.as_strided(
            (n, t, self.kernel, cin), (length * cin, s * cin, self.dilation * cin, 1)
        )
        return self.linear(cols.flatten(2))


class _MatmulConvTranspose:
    """`StreamingConvTranspose1d.apply_convtr` as one matmul on (step b - 1, step b) pairs
    (depthwise: elementwise products)."""

    def __init__(self, layer: nn.Module, build: _MimiBuild, forms: MimiForms):
        w, b = layer.convtr.convtr.weight.detach(), layer.convtr.convtr.bias  # (Cin, Cout/g, K)
        cin, s, m = w.shape[0], layer.stride, layer.steps
        self.stride, self.steps = s, m
        self.cout = layer.convtr.convtr.out_channels
        w = w.view(cin, w.shape[1], m, s).flip(2)  # (Cin, Cout/g, m, S): the older step first
        bias = None if b is None else b.detach().repeat(s).contiguous()  # (S * Cout,)
        if layer.groups == 1:  # (S * Cout, m * Cin): rows (p, cout), columns (step, cin)
            key = ("convtr", id(layer))
            w_mat = build.get(
                ("matrix", *key),
                lambda: w.permute(3, 1, 2, 0).reshape(s * w.shape[1], m * cin).contiguous(),
            )
            self.linear = build.linear(key, w_mat, bias, forms, wide_blocks=layer.latent_rate)
            self.taps = self.bias = None
        else:  # depthwise: (m, S, C)
            self.linear, self.bias = None, bias
            self.taps = w[:, 0].permute(1, 2, 0).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, cin = x.shape  # (N, m - 1 + T, Cin)
        s, m = self.stride, self.steps
        t = x.shape[1] - (m - 1)
        if self.linear is not None:
            x = x.contiguous()
            pairs = x if m == 1 else x.as_strided((n, t, m * cin), ((t + 1) * cin, cin, 1))
            y = self.linear(pairs)  # (N, T, S * Cout)
        else:  # y[n, b, p, c] = sum_j x[n, b + j, c] * taps[j, p, c]
            y = x[:, :t, None] * self.taps[0]
            for j in range(1, m):
                y = y + x[:, j : j + t, None] * self.taps[j]
            y = y.flatten(2)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(n, t * s, self.cout)


class _CodebookTables:
    """The centroids of the levels in use (and the exact search's padded copies), once."""

    def __init__(self, rvq: nn.Module, levels: int):
        if levels:
            books = rvq.codebooks(levels)  # the plain model's centroids, bit for bit
        else:
            books = torch.zeros(0, *rvq.vq.layers[0]._codebook.embedding_sum.shape)
        norms = books.pow(2).sum(-1, keepdim=True)
        self.books = books  # (levels, bins, dim) float32
        self.padded = torch.cat([books, torch.ones_like(norms), norms], -1)  # (.., dim + 2)

    def codebooks(self, n_q: int) -> torch.Tensor:
        if n_q > self.books.shape[0]:
            raise ValueError(f"tables hold {self.books.shape[0]} codebooks, {n_q} asked")
        return self.books[:n_q]

    def nearest(self, r: torch.Tensor, level: int) -> torch.Tensor:
        """`mimi.nearest_centroid` with the table made once: torch.cdist's Euclidean
        distance is [-2r, |r|^2, 1] . [e, 1, |e|^2] in one matmul, clamped, square-rooted;
        the same ops here round the same way."""
        rf = r.unsqueeze(0)  # (1, M, dim)
        rn = rf.pow(2).sum(-1, keepdim=True)
        lhs = torch.cat([rf.mul(-2), rn, torch.ones_like(rn)], dim=-1)
        dist = lhs.matmul(self.padded[level].unsqueeze(0).mT).clamp_min_(0).sqrt_()
        return dist[0].argmin(-1)

    def quantize(self, r: torch.Tensor, n_q: int) -> torch.Tensor:
        """`ResidualVQ.quantize` on the tables: (M, dim) -> (M, n_q)."""
        codes: list[torch.Tensor] = []
        for i in range(n_q):
            codes.append(self.nearest(r, i))
            if i + 1 < n_q:
                r = r - self.books[i][codes[-1]]
        return torch.stack(codes, dim=-1)


class _CertifiedSearch:
    """`ResidualVQ.quantize` through another kernel, with the exact path's codes.

    The exact path must round like the reference's torch.cdist, whose matmul some CPUs run
    slowly against a 2 MB codebook (tuned on an AMD EPYC; "auto" measures). Here scores s_j = r.e_j - |e_j|^2 / 2 (ranked like
    the distances) come from a faster kernel: the rows form for one or two rows, oneDNN's
    packed codebook for more. Rounding differs, but any float32 dot product of n terms
    lies within n 2^-24 sum|terms| of its exact value whatever the summation order, and
    here sum|terms| <= (|r| + max|e|)^2 on both sides. So where the best score leads the
    runner-up by more than 2.5x that bound (2x for the worst case of both sides, plus room
    for the float32 norms and for the square root not to tie), the reference's kernel picks
    the same centroid. Levels are certified at the end of the call; from the first level
    where some row is closer than that, the exact path reruns (its residual there is the
    same, bit for bit). Offline calls have many rows, hence many reruns: they take the
    exact path.
    """

    MAX_ROWS = 16

    def __init__(self, tables: _CodebookTables, packed: list[torch.Tensor], rows: bool):
        self.tables, self.packed, self.rows = tables, packed, rows
        norms = tables.books.pow(2).sum(-1)  # (levels, bins)
        self.neg_half_norms, self.max_norm = -0.5 * norms, norms.amax(1).sqrt()
        self.exact_reruns = 0  # levels recomputed by the exact path after a near-tie

    def __call__(self, r: torch.Tensor, n_q: int) -> torch.Tensor:
        if r.shape[0] > self.MAX_ROWS or n_q > len(self.packed):
            return self.tables.quantize(r, n_q)
        codes: list[torch.Tensor] = []
        while len(codes) < n_q:  # as many levels as it can vouch for, then one exact level
            got, r = self._levels(r, len(codes), n_q)
            codes += got
            if len(codes) == n_q:
                break
            self.exact_reruns += 1
            i = len(codes)
            codes.append(self.tables.nearest(r, i))
            if i + 1 < n_q:
                r = r - self.tables.books[i][codes[-1]]
        return torch.stack(codes, dim=-1)

    def _levels(self, r: torch.Tensor, start: int, n_q: int):
        """Levels start.. of residual rows r (M, dim) -> (their codes as far as certified,
        the residual at the first uncertified level, or at the end)."""
        books = self.tables.books
        codes, tops, residuals = [], [], []
        for i in range(start, n_q):
            if self.rows and r.shape[0] <= 2:
                s = _rows_linear(r, books[i], self.neg_half_norms[i])
            else:
                s = packed_linear(r, self.packed[i], self.neg_half_norms[i])
            top = s.topk(2, dim=-1)  # (M, 2): best and runner-up
            codes.append(top.indices[:, 0])
            tops.append(top.values)
            residuals.append(r)
            if i + 1 < n_q:
                r = r - books[i][codes[-1]]
        top2 = torch.stack(tops)  # (levels, M, 2)
        norm = torch.stack(residuals).pow(2).sum(-1).sqrt_()  # (levels, M)
        bound = (norm + self.max_norm[start:n_q, None]).square_()
        bound = bound.mul_(5 * (r.shape[1] + 2) * 2.0**-24)
        sure = (2 * (top2[..., 0] - top2[..., 1]) > bound).all(dim=1)
        good = len(codes) if bool(sure.all()) else int(sure.long().argmin())
        return codes[:good], residuals[good] if good < len(codes) else r


def _install_mimi_forms(mimi: nn.Module, forms: MimiForms, build: _MimiBuild) -> None:
    """Shadow mimi's seams with `forms` (the plain methods where a form is off)."""
    from moshi_grpc.models.mimi import (
        ResidualVQ,
        StreamingConv1d,
        StreamingConvTranspose1d,
        TransformerLayer,
    )

    for module in mimi.modules():
        for name in _MIMI_SEAMS:
            module.__dict__.pop(name, None)
    if not forms.any:
        return
    matmuls = forms.onednn_packed or forms.rows
    n_sem, k = mimi.config.semantic_codebooks, mimi.num_codebooks
    levels = {id(mimi.quantizer.rvq_first): min(k, n_sem), id(mimi.quantizer.rvq_rest): max(k - n_sem, 0)}  # fmt: skip
    for m in mimi.modules():
        if isinstance(m, StreamingConv1d) and forms.conv_matmul:
            m.apply_conv = _MatmulConv(m, build, forms)
        elif isinstance(m, StreamingConvTranspose1d) and forms.conv_matmul:
            m.apply_convtr = _MatmulConvTranspose(m, build, forms)
        elif isinstance(m, TransformerLayer) and matmuls:
            key, a = id(m), m.self_attn
            m.in_proj = build.linear(("in", key), a.in_proj_weight, None, forms, wide_blocks=False)
            m.out_proj = build.linear(("out", key), a.out_proj.weight, None, forms, wide_blocks=False)  # fmt: skip
            m.feed_forward_in = build.linear(("ff1", key), m.linear1.weight, None, forms, wide_blocks=False, gelu=True)  # fmt: skip
            m.feed_forward_out = build.linear(("ff2", key), m.linear2.weight, None, forms, wide_blocks=True)  # fmt: skip
        elif isinstance(m, ResidualVQ):
            key = id(m)
            if matmuls:
                w_in, w_out = m.input_proj.weight[:, :, 0], m.output_proj.weight[:, :, 0]
                m.project_in = build.linear(("pin", key), w_in, None, forms, wide_blocks=False)
                m.project_out = build.linear(("pout", key), w_out, None, forms, wide_blocks=False)
            if not (forms.codebook_tables or forms.fast_search):
                continue
            tables = build.get(("tables", key), lambda m=m: _CodebookTables(m, levels[id(m)]))
            m.codebooks = tables.codebooks
            packed = None
            if forms.fast_search and tables.books.shape[0]:
                packed = build.get(
                    ("search", key), lambda t=tables: [_pack_f32(b) for b in t.books]
                )
            if packed and all(p is not None for p in packed):
                m.quantize = _CertifiedSearch(tables, packed, forms.rows)
            else:
                m.quantize = tables.quantize


def _choose_mimi_forms(
    mimi: nn.Module,
    available: MimiForms,
    build: _MimiBuild,
    batches: tuple[int, ...],
    repeats: int,
) -> MimiForms:
    """Greedy: from every available form on, turn each off in turn and keep it off unless
    it wins (`_wins`) with it. The cost is ms per stream, summed over the probe batches, of a
    streaming frame (encode + decode), or for the codebook search of the quantizer alone
    (its share of a frame is smaller than the frame's noise); the rows form only matters
    at batch 1."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        probes = {}
        for b in batches:
            pcm = (0.1 * torch.randn(b, mimi.frame_size, generator=g)).to(mimi.dtype)
            latent = torch.randn(b, 1, mimi.config.dimension, generator=g).to(mimi.dtype)
            probes[b] = (mimi.streaming_encoder(b), mimi.streaming_decoder(b), pcm, latent)

    def frame(enc, dec, pcm, latent) -> None:
        dec.step_unchecked(enc.step_unchecked(pcm, None), None)

    def search(enc, dec, pcm, latent) -> None:
        mimi.quantizer.encode(latent, mimi.num_codebooks)

    def cost(forms: MimiForms, sizes: tuple[int, ...], search_only: bool) -> float:
        _install_mimi_forms(mimi, forms, build)
        run, reps = (search, 3) if search_only else (frame, 1)
        with torch.inference_mode():
            return sum(_best_ms(lambda b=b: run(*probes[b]), reps) / b for b in sizes)

    current = available
    cost(current, batches, False)  # untimed: first touch of the copies and probe states
    for f in fields(MimiForms):
        if not getattr(current, f.name) or f.name == "codebook_tables":  # never slower
            continue
        without = replace(current, **{f.name: False})
        sizes = batches[:1] if f.name == "rows" else batches
        search_only = f.name == "fast_search"
        on = off = float("inf")
        for _ in range(repeats):  # interleaved, so that a slow moment hits both
            on = min(on, cost(current, sizes, search_only))
            off = min(off, cost(without, sizes, search_only))
        what = "quantizer" if search_only else "frame"
        logger.info("Mimi CPU form %s (%s, ms per stream): %.2f on, %.2f off", f.name, what, on, off)  # fmt: skip
        if not _wins(on, off):
            current = without
    return current


# --- LM forms ---
#
# lm.py's matmuls go through bias-free `nn.Linear` modules and `Attention.project_in` /
# `project_out` (one block of rows per depformer step). `prepare_lm_for_cpu` swaps them for
# calls on oneDNN-packed copies of the same weights (the `nn.Linear` modules are replaced by
# `PackedLinear`, which keeps the same `weight` Parameter, so state-dict names do not
# change), and may choose other storage dtypes for the temporal KV cache. Call it once the
# weights are final and before making the generator (the cache is made by `LMGen`).

LM_FORMS = ("packed_linear", "attend_columns", "kv_f32_f16")


def pack_weight(w: torch.Tensor, rows: int = 1) -> torch.Tensor | None:
    """oneDNN's blocked copy of a `[out, in]` weight for `packed_linear`, or None where this
    build, device or dtype has none (float32 and bfloat16 on CPU). `rows`: the row count
    the blocking is chosen for."""
    if (
        w.device.type != "cpu"
        or w.dtype not in (torch.float32, torch.bfloat16)
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), rows)
    except (RuntimeError, AttributeError):  # a build without the op: stay plain
        return None


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """`x [..., in] @ w.T + bias` through `pack_weight(w)`: the same function as
    `F.linear(x, w, bias)`, then the exact GELU with `gelu`, applied as oneDNN writes the
    output (the same bits as `F.gelu` after, in one pass)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in): oneDNN's inner product takes 2-D input
    op, algorithm = ("gelu", "none") if gelu else ("none", "")
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, op, [], algorithm)
    return y.view(*x.shape[:-1], y.shape[-1])


class PackedLinear(nn.Module):
    """A bias-free `nn.Linear` whose matmul reads a packed copy of its weight for inputs of
    at least `min_rows` rows (`F.linear` on the weight below that: on some CPUs the packed
    kernel loses on a single row). The original `weight` Parameter stays registered
    (state-dict name and value unchanged)."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor, min_rows: int = 1) -> None:
        super().__init__()
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = packed
        self.min_rows = min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_rows * x.shape[-1]:  # a shape test: no device read
            return F.linear(x, self.weight)
        return packed_linear(x, self.packed)


class _PackedSteps:
    """`Attention.project_in` / `project_out` on packed copies of each step's rows, for
    inputs of at least `min_rows` rows (the plain method below that)."""

    def __init__(self, plain, packed: list[torch.Tensor], min_rows: int) -> None:
        self.plain = plain
        self.packed = packed
        self.min_rows = min_rows

    def __call__(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        if x.numel() < self.min_rows * x.shape[-1]:
            return self.plain(x, step)
        return packed_linear(x, self.packed[step])


def _packing_min_rows(model: nn.Module, reps: int = 5) -> int | None:
    """From how many input rows the packed form of the temporal FFN's input projection (the
    widest matmul of a step) beats `F.linear` here: the smallest of 1, 2, 4, 8 from which
    it wins at every count tested (`_wins`); None where it never does."""
    w = model.transformer.layers[0].gating.linear_in.weight
    packed = pack_weight(w)
    if packed is None:
        return None
    wins = []
    with torch.inference_mode():
        for rows in (1, 2, 4, 8):
            x = torch.randn(rows, w.shape[1], dtype=w.dtype)
            plain_ms = fast_ms = float("inf")
            for _ in range(2):  # interleaved, so that a slow moment hits both
                plain_ms = min(plain_ms, _best_ms(lambda x=x: F.linear(x, w), reps))
                fast_ms = min(fast_ms, _best_ms(lambda x=x: packed_linear(x, packed), reps))
            logger.info("LM packed_linear at %d rows: %.3f ms, plain %.3f", rows, fast_ms, plain_ms)
            wins.append((rows, _wins(fast_ms, plain_ms)))
    min_rows = None
    for rows, won in reversed(wins):
        if not won:
            break
        min_rows = rows
    return min_rows


def attend_ring_columns(
    q: torch.Tensor, keys: torch.Tensor, values_t: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """`lm.attend_ring` as matrix-vector products over contiguous ring rows (keys @ q, then
    values_t @ p): the same function; faster than the row-vector form on some CPUs and
    dtypes, slower on others (`_choose_attention` measures)."""
    from moshi_grpc.models.lm import _softmax_f32

    scores = torch.matmul(keys, q.transpose(-1, -2)).transpose(-1, -2)  # (B, H, 1, L)
    weights = _softmax_f32(scores.mul_(q.shape[-1] ** -0.5), mask).to(values_t.dtype)
    out = torch.matmul(values_t, weights.transpose(-1, -2))  # (B, H, D, 1)
    return out.transpose(-1, -2)  # (B, H, 1, D)


def _choose_attention(model: nn.Module, split_allowed: bool, reps: int = 3) -> tuple[bool, bool]:
    """(attend_columns, kv_f32_f16): the attention kernel and KV storage dtypes that attend
    fastest over a full ring here, summed over 1 and 4 rows. Candidates: `lm.attend_ring` or
    `attend_ring_columns`, on a cache in the model's dtype or, for a half-precision model,
    float32 keys and float16 values (PyTorch's reduced-precision matrix-vector kernel reads
    float16 at full speed with float32 accumulation; the cache then takes 1.5x the memory).
    Another choice than the plain one must win (`_wins`). Which wins depends on the CPU's BLAS
    and on the dtype, so it is measured rather than assumed."""
    from moshi_grpc.models.lm import attend_ring

    cfg = model.config
    h, hd, ctx = cfg.num_heads, cfg.dim // cfg.num_heads, cfg.context
    g = torch.Generator().manual_seed(0)
    kv = [(model.dtype, model.dtype)]
    if split_allowed:
        kv.append((torch.float32, torch.float16))
    inputs = {}
    for kd, vd in kv:
        for rows in (1, 4):
            inputs[kd, vd, rows] = (
                torch.randn(rows, h, 1, hd, generator=g).to(kd),
                torch.randn(rows, h, ctx, hd, generator=g).to(kd),
                torch.randn(rows, h, hd, ctx, generator=g).to(vd),
            )
    cost = {}
    with torch.inference_mode():
        for _ in range(2):  # interleaved, so that a slow moment hits every candidate
            for columns in (False, True):
                fn = attend_ring_columns if columns else attend_ring
                for split, (kd, vd) in enumerate(kv):
                    total = sum(
                        _best_ms(lambda f=fn, a=inputs[kd, vd, rows]: f(*a, None), reps)
                        for rows in (1, 4)
                    )
                    key = (columns, bool(split))
                    cost[key] = min(cost.get(key, float("inf")), total)
    for (columns, split), ms in cost.items():
        logger.info(
            "LM attention over a full ring, %s form, %s cache: %.3f ms per layer (1 + 4 rows)",
            "columns" if columns else "rows",
            "f32/f16" if split else "model-dtype",
            ms,
        )
    best = min(cost, key=cost.get)
    return best if _wins(cost[best], cost[False, False]) else (False, False)


def _pack_lm(model: nn.Module, min_rows: int) -> bool:
    """Swap every matmul of the LM for its packed form from `min_rows` input rows on; False
    if this build cannot pack."""
    from moshi_grpc.models.lm import Attention

    if pack_weight(model.text_linear.weight) is None:
        return False
    modules = list(model.named_modules())
    for _, module in modules:
        if isinstance(module, Attention):
            steps = range(module.steps)
            packed_in = [pack_weight(module.w_in(s)) for s in steps]
            packed_out = [pack_weight(module.w_out(s)) for s in steps]
            # the class's methods are the plain forms (an instance attribute shadows them)
            plain_in, plain_out = type(module).project_in, type(module).project_out
            module.project_in = _PackedSteps(plain_in.__get__(module), packed_in, min_rows)
            module.project_out = _PackedSteps(plain_out.__get__(module), packed_out, min_rows)
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                packed = PackedLinear(child, pack_weight(child.weight), min_rows)
                setattr(module, name, packed)
    return True


def parse_lm_forms(spec: str) -> str | frozenset[str]:
    """ "auto" as it is; "on", "off" or comma-separated form names (e.g.
    "packed-linear,attend-columns") as the set of forms to turn on."""
    if spec == "auto":
        return spec
    if spec in ("on", "off"):
        return frozenset(LM_FORMS if spec == "on" else ())
    wanted = _form_names(spec, LM_FORMS, "LM")
    if not wanted:  # "" or ",": say so rather than run the plain model unasked
        dashed = [f.replace("_", "-") for f in LM_FORMS]
        raise ValueError(f"unknown LM CPU forms []; auto, on, off or of {dashed}")
    return wanted


def prepare_lm_for_cpu(model: nn.Module, mode: str = "auto") -> dict[str, bool]:
    """Apply the LM's CPU forms to `model` (an `lm.LMModel`) in place; which are on.

    `mode`: "auto" turns each form on where a short measurement here says it is faster
    (about a second for the mid preset, packing included), "on" turns on every form that
    applies to the model's dtype, "off" none, and comma-separated names (`parse_lm_forms`)
    those forms. Nothing applies off CPU: there the plain model is what a CUDA graph
    captures. Call it once, on a freshly loaded model.

    - `packed_linear`: every matmul against a oneDNN-packed copy of its weight (float32 /
      bfloat16; one more copy of the weights in memory), for inputs of at least as many
      rows as the measurement found it faster from (batch size in a step).
    - `attend_columns`: temporal attention as matrix-vector products (keys @ q) instead of
      the model's row-vector products (q @ keys^T), where that is faster here.
    - `kv_f32_f16`: a half-precision model keeps its temporal KV cache as float32 keys and
      float16 values (1.5x a bfloat16 cache), attended in float32.
    """
    wanted = parse_lm_forms(mode)
    forms = dict.fromkeys(LM_FORMS, False)
    if not wanted or model.device.type != "cpu":
        return forms
    half = model.dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad():
        if wanted == "auto":
            min_rows = _packing_min_rows(model)
            columns, split = _choose_attention(model, half)
        else:  # named: on from one row, whatever a measurement would say
            min_rows = 1 if "packed_linear" in wanted else None
            columns, split = "attend_columns" in wanted, half and "kv_f32_f16" in wanted
        if min_rows is not None:
            forms["packed_linear"] = _pack_lm(model, min_rows)
            logger.info("LM packed_linear from %d input rows on", min_rows)
        if columns:
            from moshi_grpc.models.lm import TemporalLayer

            for layer in model.modules():
                if isinstance(layer, TemporalLayer):
                    layer.attend = attend_ring_columns
            forms["attend_columns"] = True
        if split:
            model.kv_dtypes = (torch.float32, torch.float16)
            forms["kv_f32_f16"] = True
    logger.info(
        "Moshi LM CPU forms (%s): %s",
        mode,
        ", ".join(f"{k} {'on' if v else 'off'}" for k, v in forms.items()),
    )
    return forms
