"""The memory plan: bytes from the configs, checked against the models' own tensors.

The arithmetic must equal what the modules and generators allocate (built on the meta
device: shapes without storage), the DESIGN figures for the 7B (15.4 GB of bf16 weights,
512 KiB of KV cache per frame and session), and the engine's refusal must name the figures.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from moshi_grpc.models import memory_plan as mp
from moshi_grpc.models.lm import PRESETS, load_lm, resolve_config
from moshi_grpc.models.lm_gen import LMGen


@pytest.mark.parametrize("name", list(PRESETS))
def test_lm_arithmetic_equals_the_models_tensors(name: str) -> None:
    cfg, _ = resolve_config(name)
    meta = mp.meta_lm(cfg, torch.bfloat16)
    assert mp.lm_parameter_count(cfg) == sum(p.numel() for p in meta.parameters())
    mem = mp.lm_memory(cfg, torch.bfloat16)
    assert mem.weights == sum(p.numel() * p.element_size() for p in meta.parameters())
    # what LMGen allocates per row (its constants cancel out between 3 rows and 1)
    one = mp.step_temporaries(lambda: LMGen(meta, 1))[1]
    three = mp.step_temporaries(lambda: LMGen(meta, 3))[1]
    assert three - one == 2 * mem.per_row
    gen = LMGen(meta, 1)
    assert mem.kv_per_row == gen.cache.nbytes_per_row()
    assert mem.depformer_per_row == sum(b[0].nbytes for b in gen.dep_scratch.buffers)


def test_7b_figures_match_the_design() -> None:
    cfg, _ = resolve_config("moshiko-7b")
    mem = mp.lm_memory(cfg, torch.bfloat16)
    assert mp.lm_parameter_count(cfg) == 7_687_729_152
    assert round(mem.weights / 1e9, 1) == 15.4 and round(mem.weights / mp.GiB, 1) == 14.3
    assert mem.kv_per_row == 512 * 1024 * 3000  # 512 KiB per frame per session
    assert round(mem.kv_per_row / mp.GiB, 3) == 1.465
    # a KV cache of float32 keys and float16 values (a CPU form) is 1.5x the bf16 one
    mixed = mp.lm_memory(cfg, torch.bfloat16, (torch.float32, torch.float16))
    assert mixed.kv_per_row * 2 == mem.kv_per_row * 3 and mixed.weights == mem.weights


def test_refusal_names_the_figures_and_what_fits() -> None:
    """Issue 20 item 10: the 7B at float32 with 16 slots needs ~75 GiB and cannot load on
    an 80 GB card; bfloat16 fits."""
    cfg, _ = resolve_config("moshiko-7b")
    card = mp.parse_size("80GB")
    with pytest.raises(mp.MemoryPlanError) as err:
        mp.check_lm_fits(cfg, torch.float32, 16, card, what="cuda:0")
    msg = str(err.value)
    assert "does not fit cuda:0" in msg and "float32 weights 28.6 GiB" in msg
    assert "16 sessions x 2.930 GiB" in msg and "at most 14 sessions fit" in msg
    assert isinstance(err.value, ValueError)
    assert mp.check_lm_fits(cfg, torch.bfloat16, 16, card).weights == 15_375_458_304
    with pytest.raises(mp.MemoryPlanError, match="not even one session"):
        mp.check_lm_fits(cfg, torch.float32, 1, mp.parse_size("30GiB"))
    with pytest.raises(mp.MemoryPlanError, match="positive integer"):
        mp.check_lm_fits(cfg, torch.bfloat16, 0, card)


@pytest.mark.parametrize(
    "text,size",
    [("80GiB", 80 * 2**30), ("141 GB", 141 * 10**9), ("81559MiB", 81559 * 2**20),
     ("1.5gib", 3 * 2**29), ("1234", 1234)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert mp.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "80 GiBs", "lots", "-1GiB", "80 GiB extra"])
def test_parse_size_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(mp.MemoryPlanError, match="cannot read the size"):
        mp.parse_size(text)


def test_temporaries_count_new_storage_only() -> None:
    """Peak and kept bytes of what a function creates; views of and writes into older
    tensors are not counted (a step's state is not its temporaries)."""
    state = torch.zeros(1000)

    def step():
        big = torch.ones(2048)  # 8 KiB, freed on return
        state.add_(1)  # in place: not counted
        view = state[:10]  # a view of older memory: not counted
        out = big[:256] * 2 + view.sum()  # 1 KiB kept (its temporaries: 1 KiB + 4 bytes)
        return out

    peak, kept = mp.step_temporaries(step)
    assert kept == 1024
    assert peak == 8192 + 1024 + 1024 + 4  # big, the product, the sum, out: all alive once


def test_plan_steps_down_until_the_pools_fit() -> None:
    lm = mp.LmMemory(weights=10, kv_per_row=100, depformer_per_row=0, state_per_row=0, context=1)
    codec = mp.CodecMemory(weights=5, state_per_row=0)
    assert mp.plan_sessions(1015, lm, codec, reserve=0).sessions == 10
    grows = mp.plan_sessions(1015, lm, codec, pools=lambda n: {"LM": 30 * n}, reserve=0)
    assert grows.sessions == 7 and grows.pools == {"LM": 210}  # 15 + 7 x 130 <= 1015
    assert grows.used() == 15 + 700 + 210
    assert mp.plan_sessions(100, lm, codec, reserve=0).sessions == 0


def test_codec_state_is_what_a_streamer_holds() -> None:
    """The meta model's per-row state equals a real tiny Mimi's conv states, their fresh
    copies and KV rings."""
    from moshi_grpc.models.mimi import load_mimi

    planned = mp.codec_memory(mp.meta_mimi("tiny")).state_per_row
    mimi = load_mimi(None, config="tiny")
    held = 0
    for streamer in (mimi.streaming_encoder(1), mimi.streaming_decoder(1)):
        tensors = (*streamer._fresh, *streamer._states, *streamer._cache.tensors(),
                   streamer._cache._row_ids)  # fmt: skip
        held += sum(t.untyped_storage().nbytes() for t in tensors)
    assert planned == held
    with pytest.raises(mp.MemoryPlanError, match="unknown Mimi config"):
        mp.meta_mimi("huge")


def test_step_temporaries_of_a_real_step_equal_the_meta_trace() -> None:
    """The meta trace sees what a real step allocates (tiny LM on CPU, same tensors)."""
    cfg, _ = resolve_config("tiny")
    real = load_lm(None, "tiny")
    assert mp.lm_step_temporaries(real, 3) == mp.lm_step_temporaries(mp.meta_lm(cfg, real.dtype), 3)
    assert mp.lm_step_temporaries(real, 3) > mp.lm_step_temporaries(real, 1) > 0


def test_bench_gpu_plan_prints_a_table_per_card(capsys) -> None:
    from moshi_grpc.bench import gpu

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(
        ["--plan", "--lm-config", "tiny", "--mimi-config", "tiny", "--gpu-memory", "1GiB"]
        + ["--gpu-memory", "512MiB", "--reserve", "256MiB"]
    )
    assert gpu.run(args) == 0
    out = capsys.readouterr().out
    assert out.count("(a plan: arithmetic from the configs, not a measurement)") == 2
    assert "| LM KV cache (context 16) | per session |" in out
    assert "graph pools + warm-up cache: codec decode (est.)" in out
    fits = [int(line.split("**")[1]) for line in out.splitlines() if "Sessions that fit" in line]
    assert len(fits) == 2 and fits[0] > fits[1] > 0
    args = parser.parse_args(["--plan", "--gpu-memory", "eighty"])
    assert gpu.run(args) == 2
    assert "cannot read the size 'eighty'" in capsys.readouterr().out


@pytest.mark.slow
def test_7b_plan_for_an_80gib_and_a_141gib_card() -> None:
    """The moshiko-7b bf16 + full Mimi plan: about 40 sessions on 80 GB, 80 on 141 GB
    (DESIGN), a little fewer once graph pools and codec state are counted."""
    cfg, _ = resolve_config("moshiko-7b")
    lm = mp.lm_memory(cfg, torch.bfloat16)
    mimi = mp.meta_mimi()
    codec = mp.codec_memory(mimi)
    pools = mp.graph_pools(mp.meta_lm(cfg, torch.bfloat16), mimi)
    small = mp.plan_sessions(mp.parse_size("80GiB"), lm, codec, pools=pools)
    large = mp.plan_sessions(mp.parse_size("141GiB"), lm, codec, pools=pools)
    assert small.used() <= small.gpu_bytes and large.used() <= large.gpu_bytes
    assert 38 <= small.sessions <= 44 and 78 <= large.sessions <= 85
    one_more = small.fixed + (small.sessions + 1) * small.per_session
    assert one_more + sum(pools(small.sessions + 1).values()) > small.gpu_bytes
