"""Shared model helpers: strict checkpoint loading, per-row rotary embeddings, ring KV cache."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from moshi_grpc.models.checkpoint import CheckpointError, load_state_strict, read_safetensors
from moshi_grpc.models.rope import apply_rope, rope_angles
from moshi_grpc.models.streaming import RingKVCache, ring_key_positions, ring_mask


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


# ---- streaming.RingKVCache and its masks (shared by the Mimi and LM transformers) ----------


def _ring(rows: int = 3, capacity: int = 5, transposed: bool = True) -> RingKVCache:
    return RingKVCache(
        2, rows, 2, capacity, 4, device="cpu", dtype=torch.float32, values_transposed=transposed
    )


@pytest.mark.parametrize("transposed", [True, False], ids=["values-transposed", "row-major"])
def test_ring_write_read_commit_and_wrap(transposed: bool) -> None:
    """T steps per call at each row's own position; the ring wraps; reads are views."""
    cache = _ring(transposed=transposed)
    g = torch.Generator().manual_seed(0)
    cache.pos.copy_(torch.tensor([0, 3, 4]))
    k, v = torch.randn(3, 2, 2, 4, generator=g), torch.randn(3, 2, 2, 4, generator=g)
    index = cache.ring_index(3, 2)
    assert index.tolist() == [[0, 1], [3, 4], [4, 0]]
    cache.write(1, k, v, index)
    cache.commit(3, 2, torch.tensor([True, False, True]))
    assert cache.pos.tolist() == [2, 3, 6]
    keys, values = cache.read(1, 3, 5)
    assert keys.data_ptr() == cache.k[1].data_ptr()  # a view: no copy
    assert values.data_ptr() == cache.v[1].data_ptr()
    if transposed:
        values = values.transpose(-1, -2)  # (B, H, L, D)
    for row, slots in enumerate(index.tolist()):
        for t, slot in enumerate(slots):
            assert torch.equal(keys[row, :, slot], k[row, :, t])
            assert torch.equal(values[row, :, slot], v[row, :, t])
    assert not cache.k[0].any() and not cache.v[0].any()  # other layers untouched


@pytest.mark.parametrize("transposed", [True, False], ids=["values-transposed", "row-major"])
def test_ring_masked_write_keeps_idle_rows_bit_for_bit(transposed: bool) -> None:
    cache = _ring(transposed=transposed)
    g = torch.Generator().manual_seed(1)
    for buf in (*cache.k, *cache.v):
        buf.copy_(torch.randn(buf.shape, generator=g))
    before = [t.clone() for t in cache.tensors()]
    k, v = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
    cache.write(0, k, v, torch.tensor([[2], [2]]), active=torch.tensor([False, True]))
    after = cache.tensors()
    for i in range(len(after)):
        assert torch.equal(after[i][0], before[i][0])  # the idle row
        assert torch.equal(after[i][2], before[i][2])  # rows past the batch
    assert torch.equal(cache.k[0][1, :, 2], k[1, :, 0])
    written = cache.v[0][1, :, :, 2] if transposed else cache.v[0][1, :, 2]
    assert torch.equal(written, v[1, :, 0])


def test_ring_prefix_reset_and_move_row() -> None:
    cache = _ring()
    view = cache.prefix(2)
    assert view is cache.prefix(2) and view.rows == 2
    view.k[1].fill_(1.0)
    view.pos.fill_(7)
    assert cache.k[1][:2].eq(1).all() and not cache.k[1][2].any()
    assert cache.pos.tolist() == [7, 7, 0]
    cache.move_row(0, 2)
    assert cache.pos.tolist() == [7, 7, 7] and cache.k[1][2].eq(1).all()
    cache.reset_rows(torch.tensor([1]))
    assert cache.pos.tolist() == [7, 0, 7]
    assert cache.nbytes_per_row() == 2 * 2 * (2 * 5 * 4 * 4)


def test_ring_row_view_writes_that_row_in_place() -> None:
    """`row(r)`: one row wherever it lies, as a one-row cache (what a prefill writes)."""
    cache = _ring()
    view = cache.row(2)
    assert view.rows == 1
    k = torch.full((1, 2, 3, 4), 5.0)
    view.write(0, k, 2 * k, torch.tensor([[0, 1, 2]]))
    assert cache.k[0][2, :, :3].eq(5).all() and not cache.k[0][:2].any()
    keys, _ = view.read(0, 1, 3)
    assert keys.data_ptr() == cache.k[0][2].data_ptr()
    with pytest.raises(IndexError):
        cache.row(3)


def test_ring_mask_matches_a_brute_force_history() -> None:
    """After writing steps 0..last one by one, ring entry j holds the newest step p with
    p % capacity == j; a query at step q sees exactly the held steps in (q - context, q]."""
    capacity, context = 6, 5
    for last in (0, 3, 5, 6, 13):
        held = {}
        for p in range(last + 1):
            held[p % capacity] = p
        kpos = ring_key_positions(torch.tensor([last]), capacity, capacity)
        assert kpos[0].tolist() == [held.get(j, j - capacity) for j in range(capacity)]
        assert all(p < 0 for j, p in enumerate(kpos[0].tolist()) if j not in held)
        qpos = torch.tensor([[last - 1, last]])
        mask = ring_mask(qpos, kpos, context)[0, 0]
        for i, q in enumerate(qpos[0].tolist()):
            want = [j in held and 0 <= q - held[j] < context for j in range(capacity)]
            assert mask[i].tolist() == want
