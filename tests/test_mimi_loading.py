"""Mimi loads both attention layouts of the reference, strictly.

`weights.safetensors` has the published (fused) names; `weights_modules.safetensors` is the
reference's own `state_dict()` of the same weights (`self_attn.in_projs.0.weight`, what
moshi >= 0.2 and fine-tuning tools write). Both come from tools/make_mimi_golden.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moshi_grpc.models.checkpoint import CheckpointError, fold_attention_layouts
from moshi_grpc.models.mimi import load_mimi

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mimi"
FUSED = FIXTURES / "weights.safetensors"
MODULES = FIXTURES / "weights_modules.safetensors"
LAYER = "encoder_transformer.transformer.layers.0.self_attn"


def _save(tensors: dict[str, torch.Tensor], tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path


def test_module_layout_fixture_is_the_reference_state_dict() -> None:
    names = set(load_file(str(MODULES)))
    assert f"{LAYER}.in_projs.0.weight" in names and f"{LAYER}.out_projs.0.weight" in names
    assert not any(n.endswith((".in_proj_weight", ".out_proj.weight")) for n in names)
    assert json.loads((FIXTURES / "meta.json").read_text())["config"] == "tiny"


def test_module_layout_loads_and_encodes_like_the_fused_layout(mimi_golden) -> None:
    fused = load_mimi(FUSED, config="tiny", num_codebooks=8)
    modules = load_mimi(MODULES, config="tiny", num_codebooks=8)
    a, b = fused.state_dict(), modules.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    codes = modules.encode(mimi_golden["audio"])
    assert torch.equal(codes, fused.encode(mimi_golden["audio"]))
    assert torch.equal(codes, mimi_golden["codes"])  # and the reference's own codes
    assert torch.equal(modules.decode(codes), fused.decode(codes))


def test_both_layouts_for_one_layer_are_refused(tmp_path) -> None:
    t = load_file(str(FUSED))
    t[f"{LAYER}.in_projs.0.weight"] = t[f"{LAYER}.in_proj_weight"].clone()
    path = _save(t, tmp_path)
    with pytest.raises(CheckpointError, match="two attention layouts") as err:
        load_mimi(path, config="tiny")
    assert str(err.value).startswith(f"{path}: ")
    assert f"{LAYER}.in_projs.0.weight" in str(err.value)
    assert f"{LAYER}.in_proj_weight" in str(err.value)


def test_module_layout_is_loaded_strictly(tmp_path) -> None:
    t = load_file(str(MODULES))
    t.pop(f"{LAYER}.out_projs.0.weight")
    t["encoder_transformer.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_mimi(_save(t, tmp_path), config="tiny")
    msg = str(err.value)
    assert f"missing: {LAYER}.out_proj.weight" in msg
    assert "unexpected: encoder_transformer.extra.weight" in msg
    # Mimi shares its projections across steps: a second step is not Mimi's shape
    t = load_file(str(MODULES))
    t[f"{LAYER}.in_projs.1.weight"] = t[f"{LAYER}.in_projs.0.weight"].clone()
    with pytest.raises(CheckpointError, match=rf"mis-shaped: {LAYER}\.in_proj_weight"):
        load_mimi(_save(t, tmp_path), config="tiny")
    t.pop(f"{LAYER}.in_projs.0.weight")
    with pytest.raises(CheckpointError, match="non-contiguous step indices"):
        load_mimi(_save(t, tmp_path), config="tiny")


def test_fold_stacks_steps_in_order_and_passes_the_rest() -> None:
    steps = {f"x.self_attn.in_projs.{i}.weight": torch.full((2, 3), float(i)) for i in (1, 0, 2)}
    out = fold_attention_layouts({**steps, "x.norm.weight": torch.ones(3)})
    assert set(out) == {"x.self_attn.in_proj_weight", "x.norm.weight"}
    assert out["x.self_attn.in_proj_weight"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(CheckpointError, match="two attention layouts"):
        fold_attention_layouts(
            {
                "x.self_attn.in_proj.weight": torch.ones(1),
                "x.self_attn.in_proj_weight": torch.ones(1),
            }
        )
