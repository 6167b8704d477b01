"""Shared model helpers: strict checkpoint loading and per-row rotary embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from moshi_grpc.models.checkpoint import CheckpointError, load_state_strict, read_safetensors
from moshi_grpc.models.rope import apply_rope, rope_angles


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3, bias=False)
        self.norm = nn.LayerNorm(3)


def _state() -> dict[str, torch.Tensor]:
    return {
        "proj.weight": torch.randn(3, 4),
        "norm.weight": torch.randn(3),
        "norm.bias": torch.randn(3),
    }


def test_strict_load_copies_and_casts(tmp_path) -> None:
    state = {k: v.to(torch.bfloat16) for k, v in _state().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    model = _Tiny()
    load_state_strict(model, read_safetensors(path))
    assert model.proj.weight.dtype == torch.float32
    assert torch.equal(model.proj.weight, state["proj.weight"].float())


def test_strict_load_names_every_problem() -> None:
    state = _state()
    del state["norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["proj.weight"] = torch.zeros(4, 4)
    with pytest.raises(CheckpointError) as err:
        load_state_strict(_Tiny(), state, source="test.safetensors")
    msg = str(err.value)
    assert "test.safetensors" in msg
    assert "1 missing: norm.bias" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "proj.weight: file (4, 4) vs model (3, 4)" in msg


def test_strict_load_rename_and_reject() -> None:
    state = {"model." + k: v for k, v in _state().items()}
    model = _Tiny()
    load_state_strict(model, state, rename=lambda n: n.removeprefix("model."))
    with pytest.raises(CheckpointError, match="3 unexpected"):
        load_state_strict(_Tiny(), state, rename=lambda n: None)


def test_read_safetensors_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_safetensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_safetensors(bad)


def test_rope_matches_complex_rotation_per_row() -> None:
    torch.manual_seed(0)
    b, h, t, d = 3, 2, 5, 8
    x = torch.randn(b, h, t, d)
    positions = torch.tensor([0, 7, 2999])
    out = apply_rope(x, rope_angles(positions, t, d, max_period=10_000))
    # Reference: complex multiplication by exp(i * pos * theta_k), theta_k = P^(-2k/d).
    z = torch.view_as_complex(x.reshape(b, h, t, d // 2, 2).double().contiguous())
    theta = torch.tensor([10_000 ** (-2 * k / d) for k in range(d // 2)], dtype=torch.float64)
    pos = positions.double().view(b, 1, 1, 1) + torch.arange(t, dtype=torch.float64).view(
        1, 1, t, 1
    )
    expected = torch.view_as_real(z * torch.exp(1j * pos * theta)).reshape(b, h, t, d)
    assert torch.allclose(out.double(), expected, atol=2e-3)
    # Row 0 at position 0: the first step is the identity.
    assert torch.allclose(out[0, :, 0], x[0, :, 0], atol=1e-6)
    # Relative property: <q_m, k_n> depends only on m - n.
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def dot(m: int, n: int) -> float:
        qm = apply_rope(q, rope_angles(torch.tensor([m]), 1, d, 10_000))
        kn = apply_rope(k, rope_angles(torch.tensor([n]), 1, d, 10_000))
        return float((qm * kn).sum())

    assert math.isclose(dot(10, 3), dot(107, 100), rel_tol=1e-4, abs_tol=1e-4)
