"""Mimi codec: parity with the reference, streaming == offline, per-row state, loading, inputs.

Golden fixtures (tests/fixtures/mimi/) come from tools/make_mimi_golden.py run with the public
reference (moshi 0.2.13) on the "tiny" config: seeded random weights saved with the official
tensor names, 2 x 1.2 s of synthetic speech-like audio. The tiny config's attention context is
10 steps, so 15 frames (30 steps) exercise the KV ring wrap-around.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moshi_grpc.models.checkpoint import CheckpointError
from moshi_grpc.models.mimi import (
    PRESETS,
    Mimi,
    MimiConfig,
    MimiInputError,
    load_mimi,
    save_mimi,
)
from moshi_grpc.models.mimi_hf import official_to_hf

FRAME = 1920
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mimi"


@pytest.fixture(scope="module")
def ref_mimi(mimi_golden) -> Mimi:
    return load_mimi(mimi_golden["weights"], config="tiny", num_codebooks=8)


@pytest.fixture(scope="module")
def tiny() -> Mimi:
    return load_mimi(None, config="tiny", num_codebooks=8, seed=3)


def _audio(batch: int, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * FRAME) / 24000
    f0 = 100 + 100 * torch.rand(batch, 1, 1, generator=g)
    x = 0.3 * torch.sin(2 * torch.pi * f0 * t) * torch.sin(2 * torch.pi * 3 * t).clamp(min=0)
    return (x + 0.02 * torch.randn(batch, 1, frames * FRAME, generator=g)).float()


def _stream_encode(mimi: Mimi, audio: torch.Tensor) -> torch.Tensor:
    enc = mimi.streaming_encoder(audio.shape[0])
    frames = audio.shape[-1] // FRAME
    return torch.stack(
        [enc.step(audio[:, 0, i * FRAME : (i + 1) * FRAME]) for i in range(frames)], -1
    )


def _stream_decode(mimi: Mimi, codes: torch.Tensor) -> torch.Tensor:
    dec = mimi.streaming_decoder(codes.shape[0])
    return torch.cat([dec.step(codes[:, :, i]) for i in range(codes.shape[-1])], -1).unsqueeze(1)


# --- parity with the reference ---------------------------------------------------------------


def test_offline_codes_and_pcm_match_reference(mimi_golden, ref_mimi):
    codes = ref_mimi.encode(mimi_golden["audio"])
    assert codes.dtype == torch.int64
    assert torch.equal(codes, mimi_golden["codes"])  # 100% identical
    pcm = ref_mimi.decode(mimi_golden["codes"])
    assert pcm.shape == mimi_golden["pcm"].shape
    assert (pcm - mimi_golden["pcm"]).abs().max().item() <= 1e-4


def test_streaming_matches_reference_offline(mimi_golden, ref_mimi):
    codes = _stream_encode(ref_mimi, mimi_golden["audio"])
    assert torch.equal(codes, mimi_golden["codes"])
    pcm = _stream_decode(ref_mimi, mimi_golden["codes"])
    assert (pcm - mimi_golden["pcm"]).abs().max().item() <= 1e-4


def test_reference_streaming_agrees_until_its_ring_wraps(mimi_golden, ref_mimi):
    # The reference's own streaming matches it offline only until its 10-step ring wraps
    # (see the module docstring); up to there it must match ours exactly.
    first = [
        f
        for f in mimi_golden["meta"]["reference_streaming_first_frame_differing_from_offline"]
        if f
    ]
    upto = min(first) if first else mimi_golden["codes"].shape[-1]
    assert upto >= 4
    ours = _stream_encode(ref_mimi, mimi_golden["audio"])
    assert torch.equal(ours[..., :upto], mimi_golden["stream_codes"][..., :upto])


# --- streaming semantics on the tiny random model ---------------------------------------------


def test_streaming_equals_offline_past_the_context(tiny):
    audio = _audio(2, 14, seed=1)  # 28 steps > context 10
    codes = tiny.encode(audio)
    assert codes.shape == (2, 8, 14)
    assert torch.equal(_stream_encode(tiny, audio), codes)
    pcm = tiny.decode(codes)
    assert pcm.shape == (2, 1, 14 * FRAME)
    assert torch.allclose(_stream_decode(tiny, codes), pcm, atol=1e-5, rtol=0)


def test_batched_rows_with_joins_masks_and_resets_equal_solo_runs(tiny):
    """3 rows: row 0 runs straight, row 1 joins late and idles in the middle, row 2 is
    reset mid-way into a new conversation. Each must equal its own solo offline run."""
    n, ticks = 3, 12
    a = _audio(4, ticks, seed=2)
    solo_audio = {
        0: a[0:1],
        1: a[1:2, :, : 8 * FRAME],
        2: a[2:3, :, : 5 * FRAME],
        3: a[3:4, :, : 7 * FRAME],
    }
    want = {k: tiny.encode(v) for k, v in solo_audio.items()}
    want_pcm = {k: tiny.decode(v) for k, v in want.items()}
    # schedule: which conversation each row feeds at each tick (None = inactive)
    plan = {0: [0] * 12, 1: [None, None, 1, 1, 1, None, None, 1, 1, 1, 1, 1]}
    plan[2] = [2] * 5 + [3] * 7
    enc, dec = tiny.streaming_encoder(n), tiny.streaming_decoder(n)
    got = {k: [] for k in want}
    got_pcm = {k: [] for k in want}
    fed = {k: 0 for k in want}
    for t in range(ticks):
        if t == 5:
            enc.reset_rows([2])
            dec.reset_rows([2])
        pcm = torch.full((n, FRAME), float("nan"))  # inactive rows: garbage is ignored
        codes_in = torch.full((n, 8), -7, dtype=torch.long)
        active = torch.zeros(n, dtype=torch.bool)
        for row in range(n):
            conv = plan[row][t]
            if conv is None:
                continue
            i = fed[conv]
            pcm[row] = solo_audio[conv][0, 0, i * FRAME : (i + 1) * FRAME]
            codes_in[row] = want[conv][0, :, i]
            active[row] = True
        out = enc.step(pcm, active)
        wav = dec.step(codes_in, active)
        for row in range(n):
            conv = plan[row][t]
            if conv is not None:
                got[conv].append(out[row])
                got_pcm[conv].append(wav[row])
                fed[conv] += 1
    for k in want:
        assert torch.equal(torch.stack(got[k], -1), want[k][0]), k
        assert torch.allclose(torch.cat(got_pcm[k]), want_pcm[k][0, 0], atol=1e-5, rtol=0), k


def test_idle_ticks_after_the_ring_wrapped_leave_the_row_exact(tiny):
    """An idle row writes into its ring entries without advancing (see `_attend`): after the
    tiny config's 11-entry ring has wrapped, idle ticks must still not change its output."""
    a = _audio(2, 12, seed=9)
    want = tiny.encode(a)
    want_pcm = tiny.decode(want)
    idle = {7, 8}  # row 1 has no frame on these ticks (14 steps in: the ring wrapped)
    enc, dec = tiny.streaming_encoder(2), tiny.streaming_decoder(2)
    got, got_pcm, fed = [[], []], [[], []], [0, 0]
    for t in range(12 + len(idle)):
        active = torch.tensor([t < 12, t not in idle and fed[1] < 12])
        pcm = torch.zeros(2, FRAME)
        codes = torch.zeros(2, 8, dtype=torch.long)
        for row in (0, 1):
            if active[row]:
                pcm[row] = a[row, 0, fed[row] * FRAME : (fed[row] + 1) * FRAME]
                codes[row] = want[row, :, fed[row]]
        out, wav = enc.step(pcm, active), dec.step(codes, active)
        for row in (0, 1):
            if active[row]:
                got[row].append(out[row])
                got_pcm[row].append(wav[row])
                fed[row] += 1
    for row in (0, 1):
        assert torch.equal(torch.stack(got[row], -1), want[row])
        assert torch.allclose(torch.cat(got_pcm[row]), want_pcm[row, 0], atol=1e-5, rtol=0)


def test_reset_of_one_row_leaves_others_bit_identical(tiny):
    a = _audio(2, 6, seed=4)
    e1, e2 = tiny.streaming_encoder(2), tiny.streaming_encoder(2)
    d1, d2 = tiny.streaming_decoder(2), tiny.streaming_decoder(2)
    codes = tiny.encode(a)
    for i in range(6):
        if i == 3:
            e2.reset_rows([1])
            d2.reset_rows([1])
        f = a[:, 0, i * FRAME : (i + 1) * FRAME]
        assert torch.equal(e1.step(f)[0], e2.step(f)[0])
        assert torch.equal(d1.step(codes[:, :, i])[0], d2.step(codes[:, :, i])[0])
    assert e2.positions.tolist() == [6, 3]


def test_inactive_step_leaves_state_untouched(tiny):
    a = _audio(2, 5, seed=5)
    e1, e2 = tiny.streaming_encoder(2), tiny.streaming_encoder(2)
    out1 = [e1.step(a[:, 0, i * FRAME : (i + 1) * FRAME]) for i in range(5)]
    out2 = []
    for i in range(5):
        if i == 2:  # a tick where row 1 has no frame: random data, masked
            # row 0 consumes an extra random frame (so it diverges); row 1 must not notice
            e2.step(torch.randn(2, FRAME), torch.tensor([True, False]))
        out2.append(e2.step(a[:, 0, i * FRAME : (i + 1) * FRAME]))
    for i in range(5):
        assert torch.equal(out1[i][1], out2[i][1])
    assert e2.positions.tolist() == [6, 5]


def test_all_true_mask_steps_like_no_mask(tiny):
    """An all-True mask takes the unmasked path; it must advance every row the same way."""
    a = _audio(2, 4, seed=6)
    e1, e2 = tiny.streaming_encoder(2), tiny.streaming_encoder(2)
    d1, d2 = tiny.streaming_decoder(2), tiny.streaming_decoder(2)
    every = torch.tensor([True, True])
    for i in range(4):
        frame = a[:, 0, i * FRAME : (i + 1) * FRAME]
        c1, c2 = e1.step(frame), e2.step(frame, every)
        assert torch.equal(c1, c2)
        assert torch.equal(d1.step(c1), d2.step(c2, every))
    assert e2.positions.tolist() == [4, 4]
    # a partial mask after all-True ticks still holds the masked row back
    e2.step(torch.randn(2, FRAME), torch.tensor([False, True]))
    assert e2.positions.tolist() == [4, 5]


def test_single_stream_equals_offline(tiny):
    """Batch 1 takes other kernels (two-row matmuls, one-row codebook search)."""
    audio = _audio(1, 13, seed=8)
    codes = tiny.encode(audio)
    assert torch.equal(_stream_encode(tiny, audio), codes)
    assert torch.allclose(_stream_decode(tiny, codes), tiny.decode(codes), atol=1e-5, rtol=0)


def test_plain_model_runs_right_after_construction() -> None:
    """No preparation step: a model built directly encodes and decodes, streams equal it,
    and weights changed in place take effect at the next call (nothing is derived once)."""
    m = Mimi(PRESETS["tiny"]).eval()
    audio = _audio(1, 2, seed=3)
    codes = m.encode(audio)
    assert codes.shape == (1, 8, 2)
    assert torch.equal(_stream_encode(m, audio), codes)
    cb = m.quantizer.rvq_first.vq.layers[0]._codebook
    with torch.no_grad():
        cb.embedding_sum.fill_(1e3)
        cb.embedding_sum[5] = 0.0  # every centroid far away but 5
    assert m.encode(audio)[0, 0].tolist() == [5, 5]
    assert m.decode(codes).shape == (1, 1, 2 * FRAME)


# --- loading -----------------------------------------------------------------------------------


def test_save_and_load_round_trip(tiny, tmp_path):
    path = tmp_path / "w.safetensors"
    save_mimi(tiny, path)
    again = load_mimi(path, config="tiny")
    a = _audio(1, 3, seed=6)
    assert torch.equal(again.encode(a), tiny.encode(a))


def test_strict_loading_names_missing_unexpected_misshaped(mimi_golden, tmp_path):
    t = load_file(str(mimi_golden["weights"]))
    t.pop("encoder.model.0.conv.conv.bias")
    t["encoder.extra.weight"] = torch.zeros(3)
    t["decoder_transformer.transformer.layers.1.linear1.weight"] = torch.zeros(5, 5)
    path = tmp_path / "bad.safetensors"
    save_file(t, str(path))
    with pytest.raises(CheckpointError) as err:
        load_mimi(path, config="tiny")
    msg = str(err.value)
    assert "missing: encoder.model.0.conv.conv.bias" in msg
    assert "unexpected: encoder.extra.weight" in msg
    assert "decoder_transformer.transformer.layers.1.linear1.weight: file (5, 5)" in msg
    with pytest.raises(CheckpointError, match="not found"):
        load_mimi(tmp_path / "nope.safetensors", config="tiny")
    # the full config does not accept the tiny file
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_mimi(mimi_golden["weights"], config="mimi")


def test_transformers_layout_loads_to_the_same_model(mimi_golden, ref_mimi, tmp_path):
    t = load_file(str(mimi_golden["weights"]))
    hf = official_to_hf(t, ref_mimi.config)
    assert "encoder_transformer.layers.0.self_attn.q_proj.weight" in hf
    assert "quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum" in hf
    path = tmp_path / "model.safetensors"
    save_file(hf, str(path))
    m = load_mimi(path, config="tiny")
    assert torch.equal(m.encode(mimi_golden["audio"]), mimi_golden["codes"])


def test_random_weights_warn_and_facts(caplog):
    with caplog.at_level("WARNING"):
        m = load_mimi(None, config="tiny", num_codebooks=3)
    assert "RANDOM" in caplog.text
    assert (m.sample_rate, m.frame_size, m.cardinality, m.num_codebooks) == (24000, 1920, 2048, 3)
    assert m.config_name == "tiny"
    assert m.encode(_audio(1, 2, seed=0)).shape == (1, 3, 2)
    with pytest.raises(ValueError, match="num_codebooks"):
        load_mimi(None, config="tiny", num_codebooks=9)
    with pytest.raises(ValueError, match="unknown Mimi config"):
        load_mimi(None, config="huge")
    assert isinstance(m.config, MimiConfig)


# --- inputs ------------------------------------------------------------------------------------


def test_offline_pads_partial_frames(tiny):
    a = _audio(1, 3, seed=7)
    short = a[..., : 2 * FRAME + 100]
    padded = torch.nn.functional.pad(short, (0, FRAME - 100))
    assert torch.equal(tiny.encode(short), tiny.encode(padded))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 1920), r"\(B, 1, T\)"),
        (torch.zeros(1, 2, 1920), r"\(B, 1, T\)"),
        (torch.zeros(1, 1, 1920, dtype=torch.int16), "float"),
        (torch.full((1, 1, 1920), float("nan")), "NaN"),
        (torch.full((1, 1, 1920), float("inf")), "NaN or Inf"),
        (torch.zeros(1, 1, 0), "empty"),
    ],
)
def test_bad_pcm_offline(tiny, bad, match):
    with pytest.raises(MimiInputError, match=match):
        tiny.encode(bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 8, 2, dtype=torch.float32), "integer"),
        (torch.zeros(1, 7, 2, dtype=torch.long), "expected 8 codebooks, got 7"),
        (torch.full((1, 8, 2), 2048), "out of range"),
        (torch.full((1, 8, 2), -1), "out of range"),
        (torch.zeros(8, 2, dtype=torch.long), r"\(B, K, F\)"),
    ],
)
def test_bad_codes_offline(tiny, bad, match):
    with pytest.raises(MimiInputError, match=match):
        tiny.decode(bad)


def test_bad_streaming_inputs(tiny):
    enc, dec = tiny.streaming_encoder(2), tiny.streaming_decoder(2)
    with pytest.raises(MimiInputError, match="shape"):
        enc.step(torch.zeros(2, 1000))
    with pytest.raises(MimiInputError, match="shape"):
        enc.step(torch.zeros(3, FRAME))
    with pytest.raises(MimiInputError, match="NaN"):
        enc.step(torch.full((2, FRAME), float("nan")))
    with pytest.raises(MimiInputError, match="active"):
        enc.step(torch.zeros(2, FRAME), torch.tensor([1, 0]))
    with pytest.raises(MimiInputError, match="active"):
        enc.step(torch.zeros(2, FRAME), torch.tensor([True]))
    with pytest.raises(MimiInputError, match="out of range"):
        dec.step(torch.full((2, 8), 4096))
    with pytest.raises(MimiInputError, match="codebooks"):
        dec.step(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(MimiInputError, match="rows must be in 0..1"):
        enc.reset_rows([5])
    with pytest.raises(MimiInputError, match="rows must be in 0..1"):
        enc.move_row(0, 2)
    with pytest.raises(ValueError):
        tiny.streaming_encoder(0)
    # a failed call leaves the state as it was
    assert enc.positions.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(mimi_golden, dtype):
    """bf16/fp16 run end to end; codes may differ from fp32 where centroids nearly tie, so
    only a majority agreement and finite, bounded audio are required."""
    m = load_mimi(mimi_golden["weights"], config="tiny", dtype=dtype)
    codes = m.encode(mimi_golden["audio"])
    # the semantic codebook mostly agrees; deeper residual levels amplify rounding
    assert (codes[:, 0] == mimi_golden["codes"][:, 0]).float().mean().item() > 0.5
    pcm = m.decode(mimi_golden["codes"])
    assert pcm.dtype == dtype and torch.isfinite(pcm).all()
    err = (pcm.float() - mimi_golden["pcm"]).abs().max().item()
    assert err < 0.1 * mimi_golden["pcm"].abs().max().item()
    # streaming runs too; half precision rounds differently per call shape, so its codes
    # are only required to be valid (fp32 is the exact path)
    step = m.streaming_encoder(2).step(mimi_golden["audio"][:, 0, :FRAME])
    assert step.shape == (2, 8) and bool(((step >= 0) & (step < 2048)).all())
    wav = m.streaming_decoder(2).step(mimi_golden["codes"][:, :, 0])
    assert wav.shape == (2, FRAME) and torch.isfinite(wav).all()


@pytest.mark.parametrize("rounds", [1, 2])
def test_bench_codec_runs_on_tiny(capsys, rounds):
    import argparse

    from moshi_grpc.bench import codec

    parser = argparse.ArgumentParser()
    codec.add_arguments(parser)
    args = parser.parse_args(
        ["--config", "tiny", "--batch", "1,2", "--frames", "2", "--warmup", "1"]
        + ["--rounds", str(rounds)]
    )
    assert codec.run(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "1", "2"]  # wall table, then CPU table
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    per_round = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(per_round) == (rounds if rounds > 1 else 0)
    assert ("medians over 2 rounds" in out) == (rounds == 2)


def test_bench_codec_rounds_take_medians_per_column():
    from moshi_grpc.bench.codec import _frame_ratio, _median_rounds

    rounds = [{1: (10.0, 20.0, 1.0, 2.0)}, {1: (30.0, 10.0, 3.0, 1.0)}, {1: (20.0, 30.0, 2.0, 3.0)}]
    assert _median_rounds(rounds) == {1: (20.0, 20.0, 2.0, 2.0)}
    assert _frame_ratio((10.0, 20.0), (40.0, 80.0)) == 0.25


def _golden_maker():
    """tools/make_mimi_golden.py as a module (it imports `moshi` only inside its functions):
    the test draws the full fixture's weights with the very recipe the maker gave the
    reference, `seeded_weights`."""
    import importlib.util

    path = FIXTURES.parent.parent.parent / "tools" / "make_mimi_golden.py"
    spec = importlib.util.spec_from_file_location("make_mimi_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_full_config_against_reference_golden(tmp_path):
    """The 79 M config against the reference, in every run: the weights are rebuilt here
    from the seed the reference was given (tests/fixtures/mimi/full, see the tool's doc) and
    read through the official-name loader; the reference's offline codes must come out
    exactly, offline and streamed (the first frames: streaming == offline at length is the
    tiny fixture's check), for the plain model and with every CPU form on."""
    from moshi_grpc.models.cpu_fast import prepare_mimi_for_cpu

    maker = _golden_maker()
    d = FIXTURES / "full"
    meta = json.loads((d / "meta.json").read_text())
    ref = maker.CONFIGS[meta["config"]]
    ours = PRESETS[meta["config"]]
    assert (ours.dimension, ours.n_filters, ours.num_heads, ours.num_layers) == (
        ref["dimension"], ref["n_filters"], ref["heads"], ref["layers"]
    )  # fmt: skip
    assert (ours.dim_feedforward, ours.context, ours.codebook_dim) == (
        ref["ff"], ref["context"], ref["cb_dim"]
    )  # fmt: skip
    shapes = json.loads((d / "tensors.json").read_text())
    weights = tmp_path / "weights.safetensors"
    save_file(maker.seeded_weights(shapes, meta["weights_seed"]), str(weights))
    g = load_file(str(d / "golden.safetensors"))
    audio = g["audio_int16"].float() / 32767
    ref_codes = g["codes"].long()
    pcm_head = g["pcm_head"]
    k, head = meta["num_codebooks"], meta["pcm_head_frames"]
    assert ref_codes.shape == (1, k, meta["frames"]) and pcm_head.shape[-1] == head * FRAME
    # the recipe's codes are spread, not one centroid winning everywhere
    assert min(len(set(ref_codes[0, q].tolist())) for q in range(k)) >= 5

    m = load_mimi(weights, config=meta["config"], num_codebooks=k)
    codes = m.encode(audio)
    assert torch.equal(codes, ref_codes)
    assert (m.decode(ref_codes)[..., : head * FRAME] - pcm_head).abs().max().item() <= 1e-4
    few = 6
    assert torch.equal(_stream_encode(m, audio[..., : few * FRAME]), ref_codes[..., :few])
    pcm = _stream_decode(m, ref_codes[..., :few])
    assert (pcm - pcm_head[..., : few * FRAME]).abs().max().item() <= 1e-4
    prepare_mimi_for_cpu(m, "on")
    assert torch.equal(m.encode(audio), ref_codes)
    assert (m.decode(ref_codes)[..., : head * FRAME] - pcm_head).abs().max().item() <= 1e-4
    assert torch.equal(_stream_encode(m, audio[..., : head * FRAME]), ref_codes[..., :head])
    assert (_stream_decode(m, ref_codes[..., :head]) - pcm_head).abs().max().item() <= 1e-4
