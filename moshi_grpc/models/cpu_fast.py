"""Faster exact forms of the models' layers on CPU, applied from above.

The model files (`mimi.py`, `lm.py`) are the math in plain torch and never import this
module. The code that runs a model on CPU (the codec and LM engines, the benchmarks) calls
`prepare_mimi_for_cpu` / `prepare_lm_for_cpu` after loading it; that swaps some of the
model's computations for forms that compute the same function with kernels that are faster
on CPU (pre-blocked oneDNN weights, BLAS-friendly operand layouts, certified shortcuts).

One mechanism for both models: a model module lists its device seams in `device_seams`
(public methods or attributes that a device form may replace); a form replaces a seam for
that instance only (`_replace`), and `_restore` puts every seam back (the plain model). One
forms API for both models: `MimiForms` and `LMForms` (a `CpuForms` each: which forms are
on) share `parse` (a spec: auto, on, off or form names), `available` (what applies to this
model here), `choose` (measure), `install` and `str` (describe); the `prepare_*` functions
run that flow. Each form is turned on only where a short measurement at load says it is
faster on this machine (a form tuned on one CPU can be slower on another), or as the
caller forces it. Tests (tests/test_mimi_cpu_forms.py, test_lm_cpu_forms.py) show that the
forms equal the plain model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# --- The one mechanism: device seams ---


def _replace(module: nn.Module, seam: str, form: Any) -> None:
    """`module`'s seam `seam` computes by `form`, for this instance only (an instance
    attribute shadows the class's method or value; not `nn.Module.__setattr__`: a form is
    no submodule and holds no state-dict entry)."""
    if seam not in getattr(type(module), "device_seams", ()):
        raise AttributeError(f"{type(module).__name__}.{seam} is not a device seam")
    module.__dict__[seam] = form


def _restore(model: nn.Module) -> None:
    """Every seam of every module of `model` back to its plain form."""
    for module in model.modules():
        for seam in getattr(type(module), "device_seams", ()):
            module.__dict__.pop(seam, None)


# --- The one forms API ---


@dataclass(frozen=True)
class CpuForms:
    """Which CPU forms of a model are on: one bool field per form (see the subclasses)."""

    model: ClassVar[str]

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.type == "bool")

    @classmethod
    def parse(cls, spec: str) -> str | CpuForms:
        """`auto`, `on` or `off` as they are; else comma-separated names of the forms to
        turn on, spelt with dashes (e.g. "conv-matmul,fast-search"); an unknown name, or
        none, is an error."""
        if spec in ("auto", "on", "off"):
            return spec
        names = {n.replace("_", "-"): n for n in cls.names()}
        wanted = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            raise ValueError(
                f"unknown {cls.model} CPU forms {unknown}; auto, on, off or of {list(names)}"
            )
        return cls(**dict.fromkeys((names[n] for n in wanted), True))

    def items(self) -> list[tuple[str, bool]]:
        """(form, on) pairs, in declaration order."""
        return [(n, getattr(self, n)) for n in self.names()]

    @property
    def any(self) -> bool:
        return any(on for _, on in self.items())

    def __and__(self, other: CpuForms) -> CpuForms:
        return replace(self, **{n: on and getattr(other, n) for n, on in self.items()})

    def __str__(self) -> str:
        return ", ".join(f"{n.replace('_', '-')} {'on' if on else 'off'}" for n, on in self.items())

    # per model: what applies here, how "auto" measures, how forms are put in place
    @classmethod
    def available(cls, model: nn.Module) -> CpuForms:
        raise NotImplementedError

    @classmethod
    def choose(cls, model: nn.Module, available: CpuForms, copies: _Copies, **probe) -> CpuForms:
        raise NotImplementedError

    def install(self, model: nn.Module, copies: _Copies) -> None:
        raise NotImplementedError


def _prepare(kind: type[CpuForms], model: nn.Module, forms: str | CpuForms, **probe) -> Any:
    """The flow of both `prepare_*`: parse, keep what applies here ("auto": measure), put
    the result in place of the plain seams (all of them first restored), say which."""
    wanted = kind.parse(forms) if isinstance(forms, str) else forms
    available = kind.available(model)
    copies = _Copies()
    with torch.no_grad():
        if wanted == "off" or not available.any:
            chosen = kind()
        elif wanted == "on":
            chosen = available
        elif wanted == "auto":
            chosen = kind.choose(model, available, copies, **probe)
        else:
            chosen = wanted & available
        _restore(model)
        chosen.install(model, copies)
    mode = forms if isinstance(forms, str) else "explicit"
    logger.info("%s CPU forms (%s): %s", kind.model, mode, chosen)
    return chosen


# --- Measuring: how every form is chosen ---

WIN_MARGIN = 0.03  # a form replaces the plain one only if it is at least this much faster


def _wins(form_ms: float, plain_ms: float) -> bool:
    """The one rule of every chooser here: a form must beat the plain computation by
    `WIN_MARGIN`, so that timing noise on a busy machine does not flip a choice (and a form
    holding a second copy of the weights is not kept for nothing)."""
    return form_ms < (1.0 - WIN_MARGIN) * plain_ms


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
# mimi.py's seams (see its docstring): `StreamingConv1d.apply_conv`,
# `StreamingConvTranspose1d.apply_convtr`, the four matmuls of `TransformerLayer`, and
# `ResidualVQ.project_in/project_out/codebooks/quantize`.
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


@dataclass(frozen=True)
class MimiForms(CpuForms):
    """Which of Mimi's CPU forms are on (see above)."""

    model: ClassVar[str] = "Mimi"
    conv_matmul: bool = False
    onednn_packed: bool = False
    rows: bool = False
    fast_search: bool = False
    codebook_tables: bool = False

    @classmethod
    def available(cls, model: nn.Module) -> MimiForms:
        if model.device.type != "cpu":
            return cls()
        packs = _pack_f32(torch.zeros(2, 2)) is not None  # a build with oneDNN's inner product
        f32 = model.dtype == torch.float32
        # the search runs on float32 residuals and codebooks whatever the model dtype
        return cls(
            conv_matmul=True, onednn_packed=packs and f32, rows=True, fast_search=packs,
            codebook_tables=True,
        )  # fmt: skip

    @classmethod
    def choose(
        cls,
        model: nn.Module,
        available: CpuForms,
        copies: _Copies,
        probe_batches: tuple[int, ...] = (1, 4),
        repeats: int = 3,
    ) -> MimiForms:
        return _choose_mimi_forms(model, available, copies, probe_batches, repeats)

    def install(self, model: nn.Module, copies: _Copies) -> None:
        _install_mimi_forms(model, self, copies)


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
    applies to the model's dtype; "off" none (the plain model); or form names / an explicit
    `MimiForms` (limited to those that apply). Off CPU nothing applies: the plain model is
    what a CUDA graph captures. Call it again after changing weights or buffers (the forms
    hold copies).
    """
    return _prepare(MimiForms, mimi, forms, probe_batches=probe_batches, repeats=repeats)


def mimi_exact_reruns(mimi: nn.Module) -> int:
    """Codebook levels the certified search handed back to the exact path (near-ties)."""
    return sum(getattr(m.__dict__.get("quantize"), "exact_reruns", 0) for m in mimi.modules())


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


class _Copies:
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

    def __init__(self, layer: nn.Module, build: _Copies, forms: MimiForms):
        w, b = layer.weight.detach(), layer.bias  # (Cout, Cin, K)
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

    def __init__(self, layer: nn.Module, build: _Copies, forms: MimiForms):
        w, b = layer.weight.detach(), layer.bias  # (Cin, Cout/g, K)
        cin, s, m = w.shape[0], layer.stride, layer.steps
        self.stride, self.steps = s, m
        self.cout = layer.out_channels
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
            books = torch.zeros(0, rvq.bins, rvq.dim)
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


def _install_mimi_forms(mimi: nn.Module, forms: MimiForms, build: _Copies) -> None:
    """Replace mimi's seams by `forms` (they are plain on entry)."""
    from moshi_grpc.models.mimi import (
        ResidualVQ,
        StreamingConv1d,
        StreamingConvTranspose1d,
        TransformerLayer,
    )

    matmuls = forms.onednn_packed or forms.rows
    n_sem, k = mimi.config.semantic_codebooks, mimi.num_codebooks
    levels = {id(mimi.quantizer.rvq_first): min(k, n_sem), id(mimi.quantizer.rvq_rest): max(k - n_sem, 0)}  # fmt: skip
    for m in mimi.modules():
        if isinstance(m, StreamingConv1d) and forms.conv_matmul:
            _replace(m, "apply_conv", _MatmulConv(m, build, forms))
        elif isinstance(m, StreamingConvTranspose1d) and forms.conv_matmul:
            _replace(m, "apply_convtr", _MatmulConvTranspose(m, build, forms))
        elif isinstance(m, TransformerLayer) and matmuls:
            key, a = id(m), m.self_attn
            for seam, w, gelu, wide in (
                ("in_proj", a.in_proj_weight, False, False),
                ("out_proj", a.out_proj.weight, False, False),
                ("feed_forward_in", m.linear1.weight, True, False),
                ("feed_forward_out", m.linear2.weight, False, True),
            ):
                form = build.linear((seam, key), w, None, forms, wide_blocks=wide, gelu=gelu)
                _replace(m, seam, form)
        elif isinstance(m, ResidualVQ):
            key = id(m)
            for seam, conv in (("project_in", m.input_proj), ("project_out", m.output_proj)):
                if matmuls:
                    w = conv.weight[:, :, 0]  # a 1x1 conv: (out, in)
                    form = build.linear((seam, key), w, None, forms, wide_blocks=False)
                    _replace(m, seam, form)
            if not (forms.codebook_tables or forms.fast_search):
                continue
            tables = build.get(("tables", key), lambda m=m: _CodebookTables(m, levels[id(m)]))
            _replace(m, "codebooks", tables.codebooks)
            packed = None
            if forms.fast_search and tables.books.shape[0]:
                packed = build.get(
                    ("search", key), lambda t=tables: [_pack_f32(b) for b in t.books]
                )
            if packed and all(p is not None for p in packed):
                _replace(m, "quantize", _CertifiedSearch(tables, packed, forms.rows))
            else:
                _replace(m, "quantize", tables.quantize)


def _choose_mimi_forms(
    mimi: nn.Module,
    available: MimiForms,
    build: _Copies,
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
        _restore(mimi)
        _install_mimi_forms(mimi, forms, build)
        run, reps = (search, 3) if search_only else (frame, 1)
        with torch.inference_mode():
            return sum(_best_ms(lambda b=b: run(*probes[b]), reps) / b for b in sizes)

    current = available
    cost(current, batches, False)  # untimed: first touch of the copies and probe states
    for name in MimiForms.names():
        if not getattr(current, name) or name == "codebook_tables":  # never slower
            continue
        without = replace(current, **{name: False})
        sizes = batches[:1] if name == "rows" else batches
        search_only = name == "fast_search"
        on = off = float("inf")
        for _ in range(repeats):  # interleaved, so that a slow moment hits both
            on = min(on, cost(current, sizes, search_only))
            off = min(off, cost(without, sizes, search_only))
        what = "quantizer" if search_only else "frame"
        logger.info("Mimi CPU form %s (%s, ms per stream): %.2f on, %.2f off", name, what, on, off)  # fmt: skip
        if not _wins(on, off):
            current = without
    return current


# --- LM forms ---
#
# lm.py's seams: the matmuls (`Linear.forward`, `Attention.project_in/project_out`, one
# block of rows per depformer step), the temporal attention (`TemporalLayer.attend`) and
# the KV cache's storage dtypes (`LMModel.kv_dtypes`). Call `prepare_lm_for_cpu` once the
# weights are final and before making the generator (the cache is made by `LMGen`).
#
# - packed-linear: every matmul against a oneDNN-packed copy of its weight (float32 /
#   bfloat16; one more copy of the weights in memory), for inputs of at least as many rows
#   as a measurement found it faster from (the batch size in a step).
# - attend-columns: the temporal attention as matrix-vector products (keys @ q) instead of
#   the model's row-vector products (q @ keys^T), where that is faster here.
# - kv-f32-f16: a half-precision model keeps its temporal KV cache as float32 keys and
#   float16 values (1.5x a bfloat16 cache), attended in float32.


@dataclass(frozen=True)
class LMForms(CpuForms):
    """Which of the LM's CPU forms are on (see above); `packed_from_rows`: the input rows
    from which packed-linear takes over (below, the plain matmul runs)."""

    model: ClassVar[str] = "LM"
    packed_linear: bool = False
    attend_columns: bool = False
    kv_f32_f16: bool = False
    packed_from_rows: int = 1

    @classmethod
    def available(cls, model: nn.Module) -> LMForms:
        if model.device.type != "cpu":
            return cls()
        half = model.dtype in (torch.bfloat16, torch.float16)
        packs = pack_weight(model.text_linear.weight) is not None
        return cls(packed_linear=packs, attend_columns=True, kv_f32_f16=half)

    @classmethod
    def choose(cls, model: nn.Module, available: CpuForms, copies: _Copies, **_) -> LMForms:
        """About a second for the mid preset: the packed matmul against the plain one at 1,
        2, 4 and 8 rows, and the attention forms over a full ring."""
        min_rows = _packing_min_rows(model) if available.packed_linear else None
        columns, split = _choose_attention(model, available.kv_f32_f16)
        return cls(
            packed_linear=min_rows is not None,
            attend_columns=columns,
            kv_f32_f16=split,
            packed_from_rows=min_rows or 1,
        )

    def install(self, model: nn.Module, copies: _Copies) -> None:
        from moshi_grpc.models.lm import Attention, Linear, TemporalLayer

        for m in model.modules():
            if self.packed_linear and isinstance(m, Attention):
                for seam, weight in (("project_in", m.w_in), ("project_out", m.w_out)):
                    steps = [weight(s) for s in range(m.steps)]
                    _replace(m, seam, _PackedMatmul(steps, self.packed_from_rows))
            elif self.packed_linear and isinstance(m, Linear):
                _replace(m, "forward", _PackedMatmul([m.weight], self.packed_from_rows))
            elif self.attend_columns and isinstance(m, TemporalLayer):
                _replace(m, "attend", attend_ring_columns)
        if self.kv_f32_f16:
            _replace(model, "kv_dtypes", (torch.float32, torch.float16))

    def __str__(self) -> str:
        rows = f" (from {self.packed_from_rows} rows)" if self.packed_from_rows > 1 else ""
        return super().__str__().replace("packed-linear on", "packed-linear on" + rows)


def prepare_lm_for_cpu(model: nn.Module, forms: str | LMForms = "auto") -> LMForms:
    """Apply the LM's CPU forms to `model` (an `lm.LMModel`) in place; which are on.

    `forms`: "auto" turns each form on where a short measurement here says it is faster,
    "on" every form that applies to the model's dtype (packed from one row), "off" none
    (the plain model), or form names (`LMForms.parse`) / an explicit `LMForms`. Nothing
    applies off CPU: there the plain model is what a CUDA graph captures. Call it before
    building the generator (the cache takes the forms' dtypes at creation).
    """
    return _prepare(LMForms, model, forms)


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


class _PackedMatmul:
    """`F.linear(x, weights[step])` through oneDNN's packed copy of that weight for inputs
    of at least `min_rows` rows (a shape test: no device read), and on the weight itself
    below that (the plain seam, bit for bit: on some CPUs the packed kernel loses on a
    single row). `step` is the depformer's codebook (0 for a plain matmul)."""

    def __init__(self, weights: list[torch.Tensor], min_rows: int) -> None:
        self.weights = weights
        self.packed = [pack_weight(w) for w in weights]
        self.min_rows = min_rows

    def __call__(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        if x.numel() < self.min_rows * x.shape[-1]:
            return F.linear(x, self.weights[step])
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
    from moshi_grpc.models.lm import softmax_f32

    scores = torch.matmul(keys, q.transpose(-1, -2)).transpose(-1, -2)  # (B, H, T, L)
    weights = softmax_f32(scores.mul_(q.shape[-1] ** -0.5), mask).to(values_t.dtype)
    out = torch.matmul(values_t, weights.transpose(-1, -2))  # (B, H, D, T)
    return out.transpose(-1, -2)  # (B, H, T, D)


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
