"""The codec replica's compute follows its load: live streams packed into a row prefix,
stepped in buckets (services/common/buckets.py), with steps that can be captured.

- Row prefix: a Mimi step over rows [0, B) leaves the other rows bit for bit; `move_row`
  and `reset_rows` carry or clear a stream's whole state.
- Bucket invariance: a stream's codes are the same alone (bucket 1), in a bucket of 4 and
  in a bucket of 16 while others join, leave (moving it to another row) and idle (masked).
  Its pcm is bit-identical while the buckets it runs in hold 4 rows or more. A step over 1
  or 2 rows takes other matmul kernels, whose last bits differ (the plain model's
  F.linear / conv1d / cdist through MKL's and oneDNN's small-batch paths on this AMD EPYC;
  the CPU forms' rows form by design), carried in the stream's state for a context: pcm
  then stays within a bound (measured 7.5e-7 against a bound of 4e-6). With the rows form
  off, every matmul runs through oneDNN's packed kernels, which give every bucket the same
  bits. The plain model and the CPU forms both hold this (moshi_grpc/models/cpu_fast.py).
- Compute follows load: rows passed to the model per tick (the bucket `run` reports).
- Capturable: every bucket's encode and decode step traces as one graph with
  `torch.compile(fullgraph=True, backend="eager")`, plain and with the CPU forms; on CUDA,
  graphs replay like eager.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moshi_grpc.models.cpu_fast import MimiForms, prepare_mimi_for_cpu
from moshi_grpc.models.mimi import load_mimi
from moshi_grpc.services.codec.engine import CodecEngine, CodecOptions, StreamerRunner

FRAME = 1920
SLOTS = 16
ALL_FORMS = MimiForms(
    conv_matmul=True, onednn_packed=True, rows=True, fast_search=True, codebook_tables=True
)
FORMS = {
    "plain": MimiForms(),
    "all": ALL_FORMS,
    "rows-off": MimiForms(
        conv_matmul=True, onednn_packed=True, fast_search=True, codebook_tables=True
    ),
}


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with every CPU form on (as the engine runs it on CPU); tests that
    want other forms set them and restore these."""
    mimi = load_mimi(None, config="tiny")
    prepare_mimi_for_cpu(mimi, ALL_FORMS)
    return mimi


def _states(streamer, rings: bool = True) -> list[torch.Tensor]:
    """Every state tensor: conv caches, positions and (with `rings`) the KV rings."""
    c = streamer._cache
    return [t.clone() for t in (*streamer._states, c.pos, *((*c.k, *c.v) if rings else ()))]


# -- the model's row-prefix step -----------------------------------------------------------


def test_step_on_a_prefix_leaves_the_other_rows_untouched(tiny) -> None:
    enc, dec = tiny.streaming_encoder(8), tiny.streaming_decoder(8)
    with torch.inference_mode():
        for _ in range(3):  # every row somewhere past its start
            dec.step(enc.step(0.1 * torch.randn(8, FRAME)))
        before_e, before_d = _states(enc), _states(dec)
        codes = enc.step(0.1 * torch.randn(2, FRAME))
        dec.step(codes, torch.tensor([True, False]))
    for a, b in zip(before_e, _states(enc), strict=True):
        assert torch.equal(a[2:], b[2:])
    for a, b in zip(before_d, _states(dec), strict=True):
        assert torch.equal(a[2:], b[2:])
    # row 1 was masked: its conv caches and position stay; its ring entries at its
    # position may take garbage that its next real step overwrites (see `KVCache`)
    n = len(_states(dec, rings=False))
    for a, b in zip(before_d[:n], _states(dec, rings=False), strict=True):
        assert torch.equal(a[1], b[1])
    assert enc.positions.tolist() == [4, 4, 3, 3, 3, 3, 3, 3]
    assert dec.positions.tolist() == [4, 3, 3, 3, 3, 3, 3, 3]


def test_move_row_and_reset_rows_carry_and_clear_a_stream(tiny) -> None:
    g = torch.Generator().manual_seed(1)
    pcm = 0.1 * torch.randn(14, FRAME, generator=g)
    solo = tiny.streaming_encoder(1)
    want = [solo.step(pcm[i : i + 1])[0] for i in range(14)]
    enc = tiny.streaming_encoder(4)
    got = []
    for i in range(14):  # the stream lives in row 3, then 1, then 0; others are noise
        row = 3 if i < 5 else 1 if i < 9 else 0
        if i in (5, 9):
            enc.move_row(3 if i == 5 else 1, row)
        x = 0.1 * torch.randn(4, FRAME, generator=g)
        x[row] = pcm[i]
        got.append(enc.step(x)[row])
    assert torch.equal(torch.stack(got), torch.stack(want))
    enc.reset_rows([0])
    fresh = tiny.streaming_encoder(1)
    assert enc.positions[0] == 0
    assert torch.equal(enc.step(pcm[:1])[0], fresh.step(pcm[:1])[0])


# -- bucket invariance through the engine's runner -----------------------------------------


def _script(peers: int, ticks: int) -> list[tuple[list[str], list[str], list[str]]]:
    """Per tick: (joins, leaves, streams with a frame). The target "t" joins after its
    peers, in the last live row; at tick 3 the peer in row 0 leaves and "t" moves there.
    A peer idles every tick (masked); a new one joins at tick 6."""
    names = [f"p{i}" for i in range(peers)]
    first = [*names, "t"]
    out = []
    live = list(first)
    for tick in range(ticks):
        joins = first if tick == 0 else []
        leaves = []
        if peers and tick == 3:
            leaves = [live[0]]  # p0 (row 0) leaves: the last live row moves into row 0
        if peers and tick == 6:
            joins = ["late"]
        live = [n for n in live if n not in leaves] + [n for n in joins if n not in live]
        idle = {live[tick % len(live)]} - {"t"} if peers else set()
        out.append((joins, leaves, [n for n in live if n not in idle]))
    return out


def _drive(mimi, script, target_pcm, target_codes, seed: int = 0):
    """Run the encode and decode runners through `script`; the target's codes and pcm,
    and the rows each tick stepped."""
    g = torch.Generator().manual_seed(seed)
    k = mimi.num_codebooks
    enc = StreamerRunner(mimi.streaming_encoder(SLOTS), SLOTS, (FRAME,), torch.float32)
    dec = StreamerRunner(mimi.streaming_decoder(SLOTS), SLOTS, (k,), torch.long)
    slot_of: dict[str, int] = {}
    codes, pcm, frame, rows_log = [], [], 0, []
    for joins, leaves, stepping in script:
        for name in leaves:
            slot = slot_of.pop(name)
            enc.leave(slot)
            dec.leave(slot)
        for name in joins:
            slot = min(set(range(SLOTS)) - set(slot_of.values()))
            slot_of[name] = slot
            enc.join(slot, None)
            dec.join(slot, None)
        slots = sorted(slot_of[n] for n in stepping)
        names = {slot_of[n]: n for n in stepping}
        pcm_in = [
            target_pcm[frame] if names[s] == "t" else 0.1 * torch.randn(FRAME, generator=g)
            for s in slots
        ]
        codes_in = [
            target_codes[frame]
            if names[s] == "t"
            else torch.randint(0, mimi.cardinality, (k,), generator=g)
            for s in slots
        ]
        enc_out, b_enc = enc.run(slots, pcm_in)
        dec_out, b_dec = dec.run(slots, codes_in)
        assert b_enc == b_dec
        rows_log.append(b_enc)
        i = slots.index(slot_of["t"])
        codes.append(enc_out[i])
        pcm.append(dec_out[i])
        frame += 1
    return torch.stack(codes), torch.stack(pcm), rows_log


@pytest.mark.slow
@pytest.mark.parametrize("forms", list(FORMS))
def test_a_stream_gives_the_same_codes_and_pcm_alone_in_4_and_in_16(tiny, forms) -> None:
    ticks = 12  # past the tiny config's 10-step attention context (ring wraps)
    g = torch.Generator().manual_seed(7)
    pcm = 0.1 * torch.randn(ticks, FRAME, generator=g)
    codes_in = torch.randint(0, tiny.cardinality, (ticks, tiny.num_codebooks), generator=g)

    prepare_mimi_for_cpu(tiny, FORMS[forms])
    try:
        codes1, pcm1, rows1 = _drive(tiny, _script(0, ticks), pcm, codes_in)
        codes4, pcm4, rows4 = _drive(tiny, _script(3, ticks), pcm, codes_in, seed=1)
        codes16, pcm16, rows16 = _drive(tiny, _script(15, ticks), pcm, codes_in, seed=2)
    finally:
        prepare_mimi_for_cpu(tiny, ALL_FORMS)

    # compute follows load: alone on a 16-slot replica, every tick steps one row
    assert rows1 == [1] * ticks
    # the smallest bucket holding the rows with a frame (an idle last row may drop it to 2)
    assert max(rows4) == 4 and min(rows4) >= 2, rows4
    assert rows16.count(16) >= ticks - 2 and min(rows16) >= 2, rows16

    assert torch.equal(codes4, codes1)
    assert torch.equal(codes16, codes1)
    # buckets of 4 rows and more: the same kernels, bit for bit, until the bucket-4 run
    # steps 2 rows (tick 4: its last live row idles)
    wide = rows4.index(2)
    assert wide >= 3
    assert torch.equal(pcm16[:wide], pcm4[:wide])
    if forms == "rows-off":  # every bucket through oneDNN's packed kernels: bit for bit
        assert torch.equal(pcm16, pcm4)
        assert torch.equal(pcm1, pcm4)
    # 1 or 2 rows vs 4 or more: other kernels round differently, carried in the state
    peak = max(1.0, pcm4.abs().max().item())
    for other in (pcm1, pcm16):
        err = (other - pcm4).abs().max().item()
        assert err <= 4e-6 * peak, err


def test_one_session_on_a_16_slot_engine_steps_one_row(tiny) -> None:
    """Through the real schedulers (warm-up at construction, joins and leaves applied)."""
    import asyncio

    async def main() -> None:
        engine = CodecEngine(tiny, CodecOptions(max_sessions=SLOTS, warmup_repeats=1))
        assert set(engine.encoder.warm_ms) == {1, 2, 4, 8, 16}
        assert set(engine.decoder.warm_ms) == {1, 2, 4, 8, 16}
        engine.start()
        try:
            enc = engine.encoder.acquire(None, "one")
            dec = engine.decoder.acquire(None, "one")
            for i in range(4):
                pcm = torch.full((FRAME,), 0.01 * i)
                codes, _ = await enc.submit_nowait(pcm)
                out, _ = await dec.submit_nowait(codes)
                assert out.shape == (FRAME,)
            enc.release()
            dec.release()
        finally:
            engine.close()
        assert list(engine.encoder.rows_log) == [1] * 4
        assert list(engine.decoder.rows_log) == [1] * 4
        assert engine.encoder.rows_stepped == 4

    asyncio.run(main())


# -- capturable steps ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("forms", ["plain", "all-but-search"])
@pytest.mark.parametrize("bucket,masked", [(1, False), (2, True), (8, False), (16, True)])
def test_every_bucket_step_traces_as_one_graph(tiny, forms, bucket: int, masked: bool) -> None:
    """No graph break in the encode or decode step, compiled == eager bit for bit: the
    plain model (what CUDA captures), and with every CPU form (oneDNN packed weights, row
    forms, matmul convs) but the certified codebook search, whose rerun decision is a host
    branch (cpu_fast.py)."""
    torch._dynamo.reset()
    traceable = MimiForms(conv_matmul=True, onednn_packed=True, rows=True, codebook_tables=True)
    prepare_mimi_for_cpu(tiny, traceable if forms == "all-but-search" else MimiForms())
    try:
        g = torch.Generator().manual_seed(bucket)
        twins = [(tiny.streaming_encoder(SLOTS), tiny.streaming_decoder(SLOTS)) for _ in "ab"]
        (e1, d1), (e2, d2) = twins
        compile_ = dict(fullgraph=True, backend="eager", dynamic=False)
        ce = torch.compile(e2.step_unchecked, **compile_)
        cd = torch.compile(d2.step_unchecked, **compile_)
        active = torch.arange(bucket) % 2 == 0 if masked else None
        with torch.inference_mode():
            for _ in range(3):
                pcm = 0.1 * torch.randn(bucket, FRAME, generator=g)
                codes = e1.step_unchecked(pcm, active)
                assert torch.equal(ce(pcm, active), codes)
                assert torch.equal(cd(codes, active), d1.step_unchecked(codes, active))
        for a, b in zip(_states(e1) + _states(d1), _states(e2) + _states(d2), strict=True):
            assert torch.equal(a, b)
    finally:
        prepare_mimi_for_cpu(tiny, ALL_FORMS)
        torch._dynamo.reset()


class _ReplayOnCpu:
    """`BucketGraphs` as the runner sees it, on CPU: capture keeps static input buffers,
    run copies the inputs into them and steps on those (what a replay reads)."""

    captured: list = []

    def __init__(self, step, device):
        self.step, self._static = step, {}

    def __contains__(self, key) -> bool:
        return key in self._static

    def capture(self, key, shape, example) -> None:
        self._static[key] = (shape, tuple(t.clone() for t in example))
        _ReplayOnCpu.captured.append(key)

    def run(self, key, inputs):
        shape, static = self._static[key]
        for buf, x in zip(static, inputs, strict=True):
            buf.copy_(x)
        return self.step(shape, *static)


def test_graph_mode_captures_every_bucket_at_warm_up_and_replays_like_eager(
    tiny, monkeypatch
) -> None:
    from moshi_grpc.services.common import runner

    monkeypatch.setattr(runner, "BucketGraphs", _ReplayOnCpu)
    _ReplayOnCpu.captured = []
    outs = []
    for graphs in (False, True):
        enc, dec = (
            StreamerRunner(tiny.streaming_encoder(8), 8, (FRAME,), torch.float32, graphs=graphs),
            StreamerRunner(tiny.streaming_decoder(8), 8, (8,), torch.long, graphs=graphs),
        )
        for b in enc.ladder:
            enc.warm_up(b)
            dec.warm_up(b)
        g = torch.Generator().manual_seed(0)
        for s in range(5):
            enc.join(s, None)
            dec.join(s, None)
        got = []
        for tick in range(6):
            if tick == 2:
                enc.leave(1)
                dec.leave(1)
            slots = [s for s in (0, 2, 3, 4) if s != tick % 5]  # one idles: masked
            codes, b = enc.run(slots, [0.1 * torch.randn(FRAME, generator=g) for _ in slots])
            wav, _ = dec.run(slots, codes)
            got.append((torch.stack(codes), torch.stack(wav), b))
        outs.append(got)
    per_bucket = [[(b, False)] + ([(b, True)] if b > 1 else []) for b in (1, 2, 4, 8)]
    assert _ReplayOnCpu.captured == [k for keys in per_bucket for k in keys * 2]  # enc, dec
    for (c0, w0, b0), (c1, w1, b1) in zip(*outs, strict=True):
        assert b0 == b1 and torch.equal(c0, c1) and torch.equal(w0, w1)
    with pytest.raises(RuntimeError, match="before any stream joins"):
        enc.warm_up(1)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_like_eager(dtype) -> None:
    """Capture every bucket at warm-up and run a join/leave/idle script through graphs
    and eagerly: the same codes, and pcm equal up to kernel choice."""
    mimi = load_mimi(None, config="tiny", device="cuda", dtype=dtype)
    k = mimi.num_codebooks
    outs = []
    for graphs in (False, True):
        enc = StreamerRunner(
            mimi.streaming_encoder(SLOTS), SLOTS, (FRAME,), torch.float32, graphs=graphs
        )
        dec = StreamerRunner(mimi.streaming_decoder(SLOTS), SLOTS, (k,), torch.long, graphs=graphs)
        for b in enc.ladder:
            enc.warm_up(b)
            dec.warm_up(b)
        g = torch.Generator().manual_seed(0)
        got = []
        for s in range(5):
            enc.join(s, None)
            dec.join(s, None)
        for tick in range(8):
            if tick == 3:
                enc.leave(1)
                dec.leave(1)
            slots = [s for s in (0, 2, 3, 4) if s != tick % 5]  # one idles: masked
            pcm = [0.1 * torch.randn(FRAME, generator=g) for _ in slots]
            codes, _ = enc.run(slots, pcm)
            wav, _ = dec.run(slots, codes)
            got.append((torch.stack(codes), torch.stack(wav).float()))
        outs.append(got)
    for (c0, w0), (c1, w1) in zip(*outs, strict=True):
        assert torch.equal(c0, c1)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert np.allclose(w0.numpy(), w1.numpy(), atol=tol, rtol=tol)


# -- the benchmarks' serving modes ---------------------------------------------------------


def test_bench_codec_load_and_bucket_timings_run_on_tiny(capsys) -> None:
    import argparse

    from moshi_grpc.bench import codec

    rows = codec.time_codec_buckets(
        device="cpu", dtype="float32", num_slots=4, sessions=(1, 2, 3), graphs=(False,),
        ticks=2, warmup=1, config="tiny",
    )  # fmt: skip
    assert [(r.sessions, r.bucket, r.graphs) for r in rows] == [(1, 1, 0), (2, 2, 0), (3, 4, 0)]
    assert all(r.tick_ms[1] >= r.tick_ms[0] > 0 and r.state_mib_per_slot > 0 for r in rows)
    assert "tick p50" in codec.format_codec_buckets(rows)

    parser = argparse.ArgumentParser()
    codec.add_arguments(parser)
    args = parser.parse_args(
        ["--config", "tiny", "--load", "1/1,1/16,4/16", "--frames", "2", "--warmup", "1"]
    )
    assert codec.run(args) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = [r for r in table if r and r[0].isdigit()]
    assert [(r[0], r[1], r[2]) for r in table] == [
        ("1", "1", "1"),
        ("1", "16", "1"),
        ("4", "16", "4"),
    ]
