"""Input checks of the codec's public calls, kept out of the model file.

The model (`mimi.py`) computes; these functions decide, before any computation, whether an
input is one the model can take, and raise `MimiInputError` (a `ValueError`, mapped to a
gRPC status by the services) naming what is wrong. They read tensor values (NaN, code
ranges), so they run on the host before a step, never inside a captured one: the checked
calls (`step`, `encode`, `decode`) call them, the `step_unchecked` paths do not.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = [
    "MimiInputError",
    "check_active",
    "check_batch",
    "check_codes",
    "check_pcm",
    "check_rows",
]


class MimiInputError(ValueError):
    """Audio or codes given to the codec have the wrong shape, dtype, length or values."""


def check_pcm(pcm, offline: bool, active: torch.Tensor | None = None) -> None:
    """Float audio, finite on every row that advances; offline (B, 1, T) and not empty."""
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


def check_codes(
    codes, k: int, card: int, offline: bool, active: torch.Tensor | None = None
) -> None:
    """Integer codes of `k` codebooks in [0, card) on every row that advances; offline
    (B, K, F) and not empty, streaming (B, K)."""
    if (
        not isinstance(codes, torch.Tensor)
        or codes.dtype.is_floating_point
        or codes.dtype == torch.bool
    ):
        raise MimiInputError(
            f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}"
        )
    if codes.dim() != (3 if offline else 2):
        want = "(B, K, F)" if offline else "(N, K)"
        raise MimiInputError(f"codes must have shape {want}, got {tuple(codes.shape)}")
    if codes.shape[1] != k:
        raise MimiInputError(f"expected {k} codebooks, got {codes.shape[1]}")
    if offline and (codes.shape[-1] == 0 or codes.shape[0] == 0):
        raise MimiInputError("codes are empty")
    bad = ((codes < 0) | (codes >= card)).flatten(1).any(dim=1)
    if active is not None:
        bad = bad & active.to(bad.device)
    if bool(bad.any()):
        raise MimiInputError(f"codes out of range 0..{card - 1}")


def check_batch(x, what: str, width: int, num_rows: int, *, exact: bool = True) -> int:
    """A streaming input (B, width) for a row prefix, 1 <= B <= num_rows; B. With `exact`
    False the width is left to a check with a more specific message."""
    ok = isinstance(x, torch.Tensor) and x.dim() == 2 and 1 <= x.shape[0] <= num_rows
    if not ok or (exact and x.shape[1] != width):
        raise MimiInputError(
            f"{what} must have shape (B, {width}) with 1 <= B <= {num_rows}, "
            f"got {tuple(getattr(x, 'shape', ()))}"
        )
    return x.shape[0]


def check_active(active, b: int) -> None:
    """`active`, when given, is a (B,) bool mask."""
    if active is None:
        return
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
        raise MimiInputError("active must be a bool tensor")
    if active.shape != (b,):
        raise MimiInputError(f"active must have shape ({b},), got {tuple(active.shape)}")


def check_rows(rows: Iterable[int], num_rows: int) -> list[int]:
    """Row indices in [0, num_rows), as a list."""
    rows = list(rows)
    if any(not 0 <= int(r) < num_rows for r in rows):
        raise MimiInputError(f"rows must be in 0..{num_rows - 1}, got {rows}")
    return [int(r) for r in rows]
