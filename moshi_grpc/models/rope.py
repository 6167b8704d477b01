"""Rotary position embedding shared by the Mimi and Moshi transformers.

Positions are per batch row (`positions[B]`), because every slot of a batched stream is at its
own place in its own conversation. The rotation is computed in float32 whatever the model
dtype: bf16 angles at position ~3000 would lose whole radians.
"""

from __future__ import annotations

import math

import torch


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


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate `x[B, H, T, D]` whose (even, odd) channel pairs are (real, imaginary) parts.

    `angles[B, T, D // 2]` comes from `rope_angles`; the result has x's dtype.
    """
    b, h, t, d = x.shape
    pairs = x.reshape(b, h, t, d // 2, 2)
    re, im = pairs[..., 0].float(), pairs[..., 1].float()  # (B, H, T, D/2)
    cos = torch.cos(angles).unsqueeze(1)  # (B, 1, T, D/2)
    sin = torch.sin(angles).unsqueeze(1)
    out_re = re * cos - im * sin
    out_im = re * sin + im * cos
    return torch.stack([out_re.to(x.dtype), out_im.to(x.dtype)], dim=-1).view(b, h, t, d)
