"""Rotary position embedding shared by the Mimi and Moshi transformers.

Positions are per batch row (`positions[B]`), because every slot of a batched stream is at its
own place in its own conversation. The rotation is computed in float32 whatever the model
dtype: bf16 angles at position ~3000 would lose whole radians.

Channels come in interleaved (real, imaginary) pairs, as in the published checkpoints. The
rotation of a pair by angle a is (re cos a - im sin a, im cos a + re sin a); `rope_tables`
lays cos and sin out per channel, (c, c) and (-s, s) for each pair, so that `rotate` is
`x * cos + swap_pairs(x) * sin`: the same products and sums, so the same bits, as the
rotation written per component, in four ops. Tables are made once per step and shared by
every layer (and by q and k, which rotate in one call).
"""

from __future__ import annotations

import math

import torch

__all__ = ["rope_angles", "rope_tables", "rotate", "apply_rope"]


def rope_angles(
    positions: torch.Tensor, steps: int, head_dim: int, max_period: float
) -> torch.Tensor:
    """Angles `[B, T, head_dim // 2]` (float32) for rows starting at `positions[B]`."""
    half = head_dim // 2
    idx = torch.arange(half, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(idx * (-math.log(max_period) * 2 / head_dim))  # (half,)
    t = positions.to(torch.float32).view(-1, 1) + torch.arange(
        steps, device=positions.device, dtype=torch.float32
    )  # (B, T)
    return t.unsqueeze(-1) * inv_freq  # (B, T, half)


def rope_tables(angles: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel `(cos, sin)` tables `[..., 2 * half]` (float32) of `angles [..., half]`
    for `rotate`. `scale` multiplies both (a caller can fold the attention's 1/sqrt(d) into
    the queries' rotation; exact when it is a power of two)."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    cos2 = torch.stack([cos, cos], -1).flatten(-2)
    sin2 = torch.stack([-sin, sin], -1).flatten(-2)
    if scale != 1.0:
        cos2, sin2 = cos2 * scale, sin2 * scale
    return cos2, sin2


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rotate `x [..., D]` by the tables of `rope_tables` (broadcastable to `x`), in float32;
    the result has `dtype` (default: x's dtype)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (im, re) per pair
    return (xf * cos + swapped * sin).to(dtype or x.dtype)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, H, T, D]` by `angles [B, T, D // 2]` from `rope_angles`; x's dtype out."""
    cos, sin = rope_tables(angles.unsqueeze(1))  # (B, 1, T, D)
    return rotate(x, cos, sin)
