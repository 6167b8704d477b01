"""Moshi LM config parsing (official config.json keys) and strict checkpoint loading."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from moshi_grpc.models.checkpoint import CheckpointError
from moshi_grpc.models.lm import PRESETS, LMConfig, LMConfigError, LMModel, load_lm

LM_DIR = FIXTURES / "lm"


@pytest.fixture
def official() -> dict[str, torch.Tensor]:
    return load_file(str(LM_DIR / "model.safetensors"))


@pytest.fixture
def config() -> dict:
    return json.loads((LM_DIR / "config.json").read_text())


def _save(tmp_path, tensors) -> str:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_presets_parse_and_expose_the_facts() -> None:
    for name in PRESETS:
        cfg = LMConfig.from_dict(PRESETS[name])
        assert cfg.num_codebooks == 17 and len(cfg.delays) == 17
    cfg = LMConfig.from_dict(PRESETS["moshiko-7b"])
    assert (cfg.n_q, cfg.dep_q, cfg.card, cfg.text_card, cfg.context) == (16, 8, 2048, 32000, 3000)
    assert cfg.delays == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert cfg.hidden == 11264 and cfg.depformer_hidden == 2816
    small = LMConfig.from_dict(PRESETS["small"])
    assert small.max_delay == 1 and (small.card, small.text_card) == (2048, 32000)
    mid = LMConfig.from_dict(PRESETS["mid"])
    assert (mid.dim, mid.num_layers, mid.depformer_dim, mid.depformer_num_layers) == (
        1024,
        12,
        512,
        4,
    )
    assert load_lm(None, "tiny").config_name == "tiny"


def test_moshiko_7b_shapes_match_the_published_checkpoint() -> None:
    """Built on the meta device: shapes of the official tensors, without allocating 7B."""
    with torch.device("meta"):
        model = LMModel(LMConfig.from_dict(PRESETS["moshiko-7b"]))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["text_emb.weight"] == (32001, 4096)
    assert shapes["emb.15.weight"] == (2049, 4096)
    assert shapes["text_linear.weight"] == (32000, 4096)
    assert shapes["transformer.layers.31.self_attn.in_proj_weight"] == (3 * 4096, 4096)
    assert shapes["transformer.layers.0.self_attn.out_proj.weight"] == (4096, 4096)
    assert shapes["transformer.layers.0.gating.linear_in.weight"] == (2 * 11264, 4096)
    assert shapes["transformer.layers.0.norm1.alpha"] == (1, 1, 4096)
    assert shapes["out_norm.alpha"] == (1, 1, 4096)
    assert shapes["depformer.layers.5.self_attn.in_proj_weight"] == (8 * 3 * 1024, 1024)
    assert shapes["depformer.layers.0.self_attn.out_proj.weight"] == (8 * 1024, 1024)
    assert shapes["depformer.layers.0.gating.7.linear_in.weight"] == (2 * 2816, 1024)
    assert shapes["depformer_in.7.weight"] == (1024, 4096)
    assert shapes["depformer_emb.6.weight"] == (2049, 1024)
    assert shapes["depformer_text_emb.weight"] == (32001, 1024)
    assert shapes["linears.7.weight"] == (2048, 1024)
    assert "depformer_emb.7.weight" not in shapes
    params = sum(v.numel() for v in model.state_dict().values())
    assert 7.5e9 < params < 7.8e9


def test_config_from_path_dict_and_errors(tmp_path, config) -> None:
    lm = load_lm(None, LM_DIR / "config.json")
    assert lm.config.card == 64 and lm.config.extra == {"moshi_name": "model.safetensors"}
    assert LMConfig.from_dict(lm.config.to_dict()) == lm.config
    bad = dict(config, not_a_key=1, other=2)
    with pytest.raises(LMConfigError, match="unknown keys: not_a_key, other"):
        load_lm(None, bad)
    missing = {k: v for k, v in config.items() if k not in ("dim", "delays")}
    with pytest.raises(ValueError, match="missing keys: delays, dim"):
        load_lm(None, missing)
    with pytest.raises(LMConfigError, match="delays"):
        LMConfig.from_dict(dict(config, delays=[0, 1]))
    with pytest.raises(LMConfigError, match="gating"):
        LMConfig.from_dict(dict(config, gating="none"))
    with pytest.raises(LMConfigError, match="norm"):
        LMConfig.from_dict(dict(config, norm="layer_norm"))
    with pytest.raises(LMConfigError, match="dim"):
        LMConfig.from_dict(dict(config, dim=0))
    with pytest.raises(LMConfigError, match="unsupported"):
        LMConfig.from_dict(dict(config, demux_second_stream=True))
    with pytest.raises(LMConfigError, match="neither a preset"):
        load_lm(None, "no-such-preset")
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    with pytest.raises(LMConfigError, match="cannot read"):
        load_lm(None, broken)
    with pytest.raises(LMConfigError, match="JSON object"):
        LMConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_random_weights_are_seeded_and_announced(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="moshi_grpc.models.lm"):
        a = load_lm(None, "tiny", seed=3)
    assert any("RANDOM" in r.getMessage() for r in caplog.records)
    b = load_lm(None, "tiny", seed=3)
    c = load_lm(None, "tiny", seed=4)
    assert torch.equal(a.text_linear.weight, b.text_linear.weight)
    assert not torch.equal(a.text_linear.weight, c.text_linear.weight)


def test_strict_loading_names_missing_unexpected_and_misshaped(tmp_path, official) -> None:
    cfg = LM_DIR / "config.json"
    tensors = dict(official)
    del tensors["linears.3.weight"]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["out_norm.alpha"] = torch.ones(1, 1, 31)
    with pytest.raises(CheckpointError) as err:
        load_lm(_save(tmp_path, tensors), cfg)
    msg = str(err.value)
    assert "1 missing: linears.3.weight" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "out_norm.alpha: file (1, 1, 31) vs model (1, 1, 32)" in msg
    with pytest.raises(CheckpointError, match="not found"):
        load_lm(tmp_path / "nope.safetensors", cfg)
    with pytest.raises(ValueError):
        load_lm(_save(tmp_path, official), "tiny")  # wrong config for the file


def test_bf16_file_loads_into_float32_and_bfloat16(official) -> None:
    assert all(v.dtype == torch.bfloat16 for v in official.values())  # like the published file
    f32 = load_lm(LM_DIR / "model.safetensors", LM_DIR / "config.json")
    b16 = load_lm(LM_DIR / "model.safetensors", LM_DIR / "config.json", dtype=torch.bfloat16)
    assert f32.dtype == torch.float32 and b16.dtype == torch.bfloat16
    got = f32.state_dict()
    for name, t in official.items():
        assert torch.equal(got[name], t.float()), name
        assert torch.equal(b16.state_dict()[name], t), name


def test_split_projection_names_load_the_same(tmp_path, official) -> None:
    """Files saved from the reference's modules spell per-step projections `in_projs.N`."""
    split = {}
    for name, t in official.items():
        if name.startswith("depformer.layers.") and name.endswith("self_attn.in_proj_weight"):
            prefix = name.removesuffix("in_proj_weight")
            for i, part in enumerate(t.chunk(8)):
                split[f"{prefix}in_projs.{i}.weight"] = part
        elif name.startswith("depformer.layers.") and name.endswith("self_attn.out_proj.weight"):
            prefix = name.removesuffix("out_proj.weight")
            for i, part in enumerate(t.chunk(8)):
                split[f"{prefix}out_projs.{i}.weight"] = part
        elif name.endswith("self_attn.in_proj_weight"):
            split[name.removesuffix("in_proj_weight") + "in_projs.0.weight"] = t
        else:
            split[name] = t
    a = load_lm(LM_DIR / "model.safetensors", LM_DIR / "config.json")
    b = load_lm(_save(tmp_path, split), LM_DIR / "config.json")
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


def test_a_projection_in_both_layouts_is_refused(tmp_path, official) -> None:
    """Which copy holds the weights would be a guess: strict loading refuses the file."""
    both = dict(official)
    name = "depformer.layers.0.self_attn.in_proj_weight"
    for i, part in enumerate(official[name].chunk(8)):
        both[f"depformer.layers.0.self_attn.in_projs.{i}.weight"] = part.clone()
    with pytest.raises(CheckpointError, match="two attention layouts"):
        load_lm(_save(tmp_path, both), LM_DIR / "config.json")
