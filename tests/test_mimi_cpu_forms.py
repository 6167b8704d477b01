"""Mimi's CPU forms (moshi_grpc/models/cpu_fast.py) compute the plain model's function.

Golden: on the committed reference fixtures (tests/fixtures/mimi/, see test_mimi.py), every
set of forms gives the plain model's codes exactly and its pcm within 1e-5, offline and
streamed in a batch with masked rows and a reset. Layer by layer, the conv forms equal the
plain convolutions on uneven chunks, and the certified codebook search defers to the exact
path on a tie.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from moshi_grpc.models import mimi as mimi_module
from moshi_grpc.models.cpu_fast import (
    MimiForms,
    _Copies,
    _MatmulConv,
    _MatmulConvTranspose,
    mimi_exact_reruns,
    prepare_mimi_for_cpu,
)
from moshi_grpc.models.mimi import (
    PRESETS,
    ConvStates,
    Mimi,
    StreamingConv1d,
    StreamingConvTranspose1d,
    load_mimi,
)

FRAME = 1920
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mimi"
ALL = MimiForms(
    conv_matmul=True, onednn_packed=True, rows=True, fast_search=True, codebook_tables=True
)
FORM_SETS = [
    ALL,
    MimiForms(conv_matmul=True),
    MimiForms(onednn_packed=True),
    MimiForms(rows=True),
    MimiForms(fast_search=True),
    MimiForms(codebook_tables=True),
    MimiForms(conv_matmul=True, onednn_packed=True, fast_search=True, codebook_tables=True),
]


@pytest.fixture(scope="module")
def model():
    return load_mimi(FIXTURES / "weights.safetensors", config="tiny", num_codebooks=8)


@pytest.fixture(scope="module")
def plain(model, mimi_golden) -> dict:
    """The plain model's outputs: offline, and streamed by `_stream`."""
    prepare_mimi_for_cpu(model, "off")
    return {
        "codes": model.encode(mimi_golden["audio"]),
        "pcm": model.decode(mimi_golden["codes"]),
        "stream": _stream(model, mimi_golden["audio"], mimi_golden["codes"]),
    }


def _stream(mimi: Mimi, audio: torch.Tensor, codes: torch.Tensor):
    """Rows 0 and 1 carry the two fixture streams, row 2 noise; row 1 idles (masked) on
    tick 3 and row 2 is reset on tick 5. Per stream: its codes and pcm, frame by frame."""
    n, frames = 3, codes.shape[-1]
    enc, dec = mimi.streaming_encoder(n), mimi.streaming_decoder(n)
    g = torch.Generator().manual_seed(0)
    fed = [0, 0]
    got_codes, got_pcm = [[], []], [[], []]
    for tick in range(frames + 1):
        if tick == 5:
            enc.reset_rows([2])
            dec.reset_rows([2])
        active = torch.tensor([fed[0] < frames, tick != 3 and fed[1] < frames, True])
        pcm = 0.1 * torch.randn(n, FRAME, generator=g)
        code_in = torch.randint(0, 2048, (n, 8), generator=g)
        for row in (0, 1):
            if active[row]:
                pcm[row] = audio[row, 0, fed[row] * FRAME : (fed[row] + 1) * FRAME]
                code_in[row] = codes[row, :, fed[row]]
        out, wav = enc.step(pcm, active), dec.step(code_in, active)
        for row in (0, 1):
            if active[row]:
                got_codes[row].append(out[row])
                got_pcm[row].append(wav[row])
                fed[row] += 1
    return [(torch.stack(c, -1), torch.cat(p)) for c, p in zip(got_codes, got_pcm)]


@pytest.mark.parametrize("forms", FORM_SETS, ids=str)
def test_forms_give_the_plain_models_codes_and_pcm(model, mimi_golden, plain, forms) -> None:
    assert prepare_mimi_for_cpu(model, forms) == forms
    try:
        codes = model.encode(mimi_golden["audio"])
        assert torch.equal(codes, plain["codes"])
        assert torch.equal(codes, mimi_golden["codes"])  # the reference's codes too
        assert (model.decode(mimi_golden["codes"]) - plain["pcm"]).abs().max().item() <= 1e-5
        for (c, p), (want_c, want_p) in zip(
            _stream(model, mimi_golden["audio"], mimi_golden["codes"]), plain["stream"], strict=True
        ):
            assert torch.equal(c, want_c)
            assert (p - want_p).abs().max().item() <= 1e-5
    finally:
        prepare_mimi_for_cpu(model, "off")


def test_plain_streaming_is_the_offline_model(mimi_golden, plain) -> None:
    """The baseline the forms are held to is itself right: streamed == offline."""
    for row, (c, p) in enumerate(plain["stream"]):
        assert torch.equal(c, plain["codes"][row])
        assert (p - plain["pcm"][row, 0]).abs().max().item() <= 1e-5


def test_off_restores_the_plain_callables_and_modes_are_checked(model) -> None:
    layer = model.encoder.model[0]
    prepare_mimi_for_cpu(model, ALL)
    assert isinstance(layer.apply_conv, _MatmulConv)
    assert prepare_mimi_for_cpu(model, "off") == MimiForms()
    assert layer.apply_conv.__func__ is StreamingConv1d.apply_conv
    assert not any("quantize" in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="unknown Mimi CPU forms"):
        prepare_mimi_for_cpu(model, "fast")
    with pytest.raises(ValueError, match="unknown Mimi CPU forms"):
        MimiForms.parse("rows,turbo")
    assert MimiForms.parse("rows, fast-search") == MimiForms(rows=True, fast_search=True)
    assert MimiForms.parse("auto") == "auto"
    assert prepare_mimi_for_cpu(model, "rows,codebook-tables") == MimiForms(
        rows=True, codebook_tables=True
    )
    assert prepare_mimi_for_cpu(model, "off") == MimiForms()
    assert str(MimiForms(rows=True)) == (
        "conv-matmul off, onednn-packed off, rows on, fast-search off, codebook-tables off"
    )


def test_auto_chooses_among_the_forms_that_apply_and_nothing_applies_off_cpu(
    model, mimi_golden, plain
) -> None:
    try:
        chosen = prepare_mimi_for_cpu(model, "auto", probe_batches=(1, 2), repeats=1)
        assert chosen == chosen & prepare_mimi_for_cpu(model, "on")  # a subset of "on"
        prepare_mimi_for_cpu(model, chosen)
        assert torch.equal(model.encode(mimi_golden["audio"]), plain["codes"])
    finally:
        prepare_mimi_for_cpu(model, "off")
    bf16 = load_mimi(None, config="tiny", dtype=torch.bfloat16)
    assert not prepare_mimi_for_cpu(bf16, "on").onednn_packed  # float32 weights only
    with torch.device("meta"):
        meta = Mimi(PRESETS["tiny"])
    assert prepare_mimi_for_cpu(meta, "on") == MimiForms()


def test_model_file_does_not_import_the_cpu_forms() -> None:
    tree = ast.parse(Path(mimi_module.__file__).read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    ]
    assert not any("cpu_fast" in name for name in names)


# -- layer by layer ------------------------------------------------------------------------


def _stream_layer(layer, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed (N, T, C) through a streaming conv layer in chunks of the given lengths."""
    state = layer.init_state(x.shape[0], x.device, x.dtype)
    outs, t = [], 0
    for c in chunks:
        states = ConvStates(state)
        outs.append(layer(x[:, t : t + c], states))
        state, t = states.new, t + c
    return torch.cat(outs, 1)


@pytest.mark.parametrize("forms", [ALL, MimiForms(conv_matmul=True)], ids=str)
@pytest.mark.parametrize(
    "cin, cout, kernel, stride, dilation, latent_rate, tap_groups",
    [
        (6, 4, 3, 1, 1, False, 3),  # shift-add, stride 1 (the residual convs)
        (6, 4, 3, 1, 2, False, 3),  # shift-add with dilation
        (4, 6, 8, 4, 1, False, 2),  # shift-add over blocks of 4 (the downsampling convs)
        (4, 5, 4, 4, 1, False, 1),  # kernel == stride: no context
        (1, 8, 7, 1, 1, False, 0),  # im2col: partial sums would be larger than the columns
        (6, 4, 3, 1, 2, True, 0),  # im2col: the 25 Hz side
        (4, 6, 8, 4, 1, True, 0),
        (4, 6, 1, 1, 1, False, 0),  # 1x1
    ],
)
def test_matmul_conv_forms_equal_the_plain_conv(
    forms, cin, cout, kernel, stride, dilation, latent_rate, tap_groups
) -> None:
    """Both matmul forms equal the plain layer, whole or fed in uneven chunks, and the
    plain layer equals nn.Conv1d on the left-zero-padded input."""
    torch.manual_seed(0)
    layer = StreamingConv1d(cin, cout, kernel, stride, dilation, latent_rate=latent_rate)
    x = torch.randn(2, 24 * stride, cin)
    conv = layer.conv.conv  # the nn.Conv1d of the checkpoint's nesting
    pad = (kernel - 1) * dilation + 1 - stride
    with torch.inference_mode():
        want = conv(torch.nn.functional.pad(x.transpose(1, 2), (pad, 0))).transpose(1, 2)
        whole = _stream_layer(layer, x, [24 * stride])
        torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-5)
        layer.apply_conv = _MatmulConv(layer, _Copies(), forms)
        assert layer.apply_conv.tap_groups == tap_groups
        fast = _stream_layer(layer, x, [24 * stride])
        parts = _stream_layer(layer, x, [5 * stride, stride, 18 * stride])
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts, fast, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("forms", [ALL, MimiForms(conv_matmul=True)], ids=str)
@pytest.mark.parametrize("kernel", [4, 8])
@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_transposed_conv_equals_the_plain_one(forms, kernel, groups, bias) -> None:
    """The pair matmul (or depthwise products) equals the plain layer, which equals
    nn.ConvTranspose1d with its incomplete tail dropped, whole or in chunks."""
    torch.manual_seed(1)
    layer = StreamingConvTranspose1d(6, 6, kernel, 4, groups=groups, bias=bias)
    x = torch.randn(3, 20, 6)
    with torch.inference_mode():
        want = layer.convtr.convtr(x.transpose(1, 2))[..., : 20 * 4].transpose(1, 2)
        whole = _stream_layer(layer, x, [20])
        plain_parts = _stream_layer(layer, x, [1, 7, 12])
        layer.apply_convtr = _MatmulConvTranspose(layer, _Copies(), forms)
        fast = _stream_layer(layer, x, [20])
        parts = _stream_layer(layer, x, [1, 7, 12])
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_parts, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts, fast, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 5])
def test_certified_search_equals_the_exact_path_and_reruns_ties(rows) -> None:
    """The certified search gives the plain model's codes; on a tie it defers to the exact
    path, which (like torch.cdist + argmin) picks the lower of two equal centroids."""
    m = load_mimi(None, config="tiny", num_codebooks=8, seed=11)
    rvq = m.quantizer.rvq_rest
    x = torch.randn(rows, 1, m.config.dimension, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = rvq.encode(x, 7)
        prepare_mimi_for_cpu(m, MimiForms(fast_search=True))
        assert torch.equal(rvq.encode(x, 7), plain)
    assert mimi_exact_reruns(m) == 0
    # an exact tie at level 0: a copy of row 0's nearest centroid at another index
    best = int(plain[0, 0, 0])
    twin = 0 if best > 0 else 1
    cb = rvq.vq.layers[0]._codebook
    cb.embedding_sum[twin] = cb.embedding_sum[best]
    cb.cluster_usage[twin] = cb.cluster_usage[best]
    with torch.inference_mode():
        prepare_mimi_for_cpu(m, "off")
        plain = rvq.encode(x, 7)
        prepare_mimi_for_cpu(m, MimiForms(fast_search=True))  # the forms hold copies: again
        got = rvq.encode(x, 7)
    assert int(got[0, 0, 0]) == int(plain[0, 0, 0]) == min(best, twin)
    assert torch.equal(got, plain)
    assert mimi_exact_reruns(m) > 0
