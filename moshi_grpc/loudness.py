"""Loudness normalisation of a voice prompt, as PersonaPlex applies it (torch-free, numpy).

NVIDIA's PersonaPlex normalises a voice prompt to -24 LUFS before Mimi encodes it
(docs/PERSONAPLEX.md §3): ITU-R BS.1770-4 integrated loudness measured by `pyloudnorm` at
24 kHz, then every sample times one gain, no clipping. A persona session must feed the model
the same codes, so this module redoes pyloudnorm's arithmetic operation for operation, in the
same precisions (its float32 buffers included), and reaches the reference's float32 samples
bit for bit (tests/fixtures/persona/loudness.json):

1. K-weighting: two biquads designed at the signal's rate by the RBJ cookbook (high shelf
   +4 dB, Q 1/sqrt(2), 1500 Hz; high pass, Q 0.5, 38 Hz), each run as scipy's `lfilter`
   runs it (transposed direct form II in float64), each output stored back into the float32
   copy of the signal (pyloudnorm filters in place).
2. 400 ms blocks with 75 % overlap, `round((T - 0.4) / 0.1) + 1` of them; block j spans
   samples [int(0.4 * 0.25 j * rate), int(0.4 * (0.25 j + 1) * rate)) (a last block past the
   end is summed over what is there and still divided by 0.4 s of samples); its mean square
   is a float32 sum of float32 squares times float32(1 / (0.4 rate)).
3. Block loudness -0.691 + 10 log10(z); absolute gate -70 LUFS, relative gate -10 LU below
   the loudness of the blocks above the absolute gate; the integrated loudness is that of
   the blocks above both.
4. gain = 10 ** ((-24 - L) / 20); the normalised voice is float32(gain * float64(x)).

The filters walk the signal sample by sample (a recursion: there is no vectorised form with
the same rounding); about 0.3 s of one core per 10 s of 24 kHz voice. Callers on an event
loop run it in a worker thread.
"""

from __future__ import annotations

import math

import numpy as np

TARGET_LUFS = -24.0  # PersonaPlex's voice prompt level
BLOCK_S = 0.4  # BS.1770 gating block
OVERLAP = 0.75
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0


class LoudnessError(ValueError):
    """A signal whose loudness cannot be measured: shorter than one block, or silent."""


def _biquad(kind: str, gain_db: float, q: float, fc: float, rate: int) -> tuple[float, ...]:
    """(b0, b1, b2, a1, a2) of an RBJ-cookbook biquad, normalised by a0, in pyloudnorm's
    arithmetic (numpy float64 scalars, its operation order)."""
    a = 10 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * (fc / rate)
    alpha = np.sin(w0) / (2.0 * q)
    cos = np.cos(w0)
    if kind == "high_shelf":
        b = (
            a * ((a + 1) + (a - 1) * cos + 2 * np.sqrt(a) * alpha),
            -2 * a * ((a - 1) + (a + 1) * cos),
            a * ((a + 1) + (a - 1) * cos - 2 * np.sqrt(a) * alpha),
        )
        den = (
            (a + 1) - (a - 1) * cos + 2 * np.sqrt(a) * alpha,
            2 * ((a - 1) - (a + 1) * cos),
            (a + 1) - (a - 1) * cos - 2 * np.sqrt(a) * alpha,
        )
    elif kind == "high_pass":
        b = ((1 + cos) / 2, -(1 + cos), (1 + cos) / 2)
        den = (1 + alpha, -2 * cos, 1 - alpha)
    else:
        raise ValueError(f"unknown biquad kind {kind!r}")
    nb = np.array(b) / den[0]
    na = np.array(den) / den[0]
    return float(nb[0]), float(nb[1]), float(nb[2]), float(na[1]), float(na[2])


def k_weighting(rate: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """BS.1770's two K-weighting stages at `rate` Hz: the high shelf, then the high pass."""
    return (
        _biquad("high_shelf", 4.0, 1 / np.sqrt(2), 1500.0, rate),
        _biquad("high_pass", 0.0, 0.5, 38.0, rate),
    )


def _filter(coefficients: tuple[float, ...], x: np.ndarray) -> list[float]:
    """One biquad over `x` in transposed direct form II, float64, in scipy lfilter's
    operation order (Python floats are IEEE doubles: the same roundings, sample by sample)."""
    b0, b1, b2, a1, a2 = coefficients
    z0 = z1 = 0.0
    out = x.tolist()
    for n, xn in enumerate(out):
        yn = z0 + b0 * xn
        z0 = z1 + xn * b1 - yn * a1
        z1 = xn * b2 - yn * a2
        out[n] = yn
    return out


def integrated_loudness(samples: np.ndarray, rate: int) -> float:
    """BS.1770-4 integrated loudness of mono `samples` (LUFS; -inf when every block is gated
    out), as pyloudnorm measures a float32 signal. LoudnessError below one 400 ms block."""
    x = np.array(samples, dtype=np.float32).reshape(-1)
    n = x.shape[0]
    if n < BLOCK_S * rate:
        raise LoudnessError(f"shorter than {BLOCK_S:g} s (one loudness block)")
    for stage in k_weighting(rate):
        x[:] = _filter(stage, x)  # stored back in float32, as pyloudnorm does
    step = 1.0 - OVERLAP
    blocks = int(np.round((n / rate - BLOCK_S) / (BLOCK_S * step)) + 1)
    scale = np.float32(1.0 / (BLOCK_S * rate))
    squares = np.square(x)
    z = np.empty(blocks, np.float64)
    for j in range(blocks):
        lo = int(BLOCK_S * (j * step) * rate)
        hi = int(BLOCK_S * (j * step + 1) * rate)
        z[j] = np.sum(squares[lo:hi]) * scale  # float32 sum, float32 product
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10.0 * np.log10(z)
    above = z[block_lufs >= ABSOLUTE_GATE_LUFS]
    if above.size == 0:
        return -math.inf
    relative = -0.691 + 10.0 * np.log10(np.mean(above)) + RELATIVE_GATE_LU
    gated = z[(block_lufs > relative) & (block_lufs > ABSOLUTE_GATE_LUFS)]
    if gated.size == 0:
        return -math.inf
    return float(-0.691 + 10.0 * np.log10(np.mean(gated)))


def normalize(
    samples: np.ndarray, rate: int, target_lufs: float = TARGET_LUFS
) -> tuple[np.ndarray, float, float]:
    """`samples` at `target_lufs` as float32, with their measured loudness and the gain:
    (normalised, loudness, gain). LoudnessError for a signal shorter than one block or
    silent (nothing above the gates: its loudness is -inf, no gain can reach the target)."""
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    loudness = integrated_loudness(x, rate)
    if not math.isfinite(loudness):
        raise LoudnessError("silent (no 400 ms block above -70 LUFS)")
    gain = float(np.power(10.0, (target_lufs - loudness) / 20.0))
    return (gain * x.astype(np.float64)).astype(np.float32), loudness, gain
