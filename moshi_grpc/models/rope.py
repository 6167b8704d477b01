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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x[..., D]` whose (even, odd) channel pairs are (real, imaginary) parts, by
    `cos, sin` (float32, broadcastable to `[..., D // 2]`); the result is float32.

    Callers that rotate several tensors at one position (the LM's queries and keys in one
    call) compute `cos, sin` once per step.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate `x[B, H, T, D]` by `angles[B, T, D // 2]` from `rope_angles`; x's dtype out."""
    return rotate(x, torch.cos(angles).unsqueeze(1), torch.sin(angles).unsqueeze(1)).to(x.dtype)
