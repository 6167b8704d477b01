"""The LM service on loopback: batched sessions equal solo generator runs (greedy and
seeded sampling), joins/leaves, failover replay, and bad inputs answered with their status."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from svc_harness import until_queued

from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import common_pb2, lm_pb2, lm_pb2_grpc

GREEDY = common_pb2.SamplingParams(
    text_temperature=0, text_top_k=0, audio_temperature=0, audio_top_k=0
)


@pytest.fixture(scope="module")
def tiny_lm():
    from moshi_grpc.models.lm import load_lm
    from moshi_grpc.models.text import TextTokenizer

    torch.manual_seed(0)
    return load_lm(None, config="tiny"), TextTokenizer(None)


def user_codes(seed: int, steps: int, card: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, card, (steps, 8), generator=g).tolist()


def solo(lm, codes: list[list[int]], sampling, seed: int | None) -> list[tuple]:
    """One session alone through the model API (a generator with a single slot)."""
    from moshi_grpc.models.lm_gen import LMGen, SamplingConfig

    gen = LMGen(lm, 1)
    gen.reset(
        0,
        SamplingConfig(
            sampling.text_temperature,
            sampling.text_top_k,
            sampling.audio_temperature,
            sampling.audio_top_k,
        ),
        seed,
    )
    out = []
    for c in codes:
        r = gen.step(torch.tensor([c]), torch.tensor([True]))
        ready = bool(r.ready[0])
        out.append((ready, int(r.text[0]), r.audio[0].tolist()) if ready else (False,))
    return out


def fetch(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def as_tuple(o: lm_pb2.StepOutput) -> tuple:
    return (True, o.text_token, list(o.moshi_codes)) if o.ready else (False,)


def step_open(sid: str, sampling=GREEDY, seed: int | None = None, replay=()) -> lm_pb2.StepRequest:
    return lm_pb2.StepRequest(
        open=lm_pb2.LmOpen(session_id=sid, sampling=sampling, seed=seed, replay=list(replay))
    )


def step_frame(i: int, codes) -> lm_pb2.StepRequest:
    return lm_pb2.StepRequest(frame=lm_pb2.UserCodes(index=i, codes=list(codes)))


async def session(stub, sid, codes, *, sampling=GREEDY, seed=None, replay=(), first=0, after=None):
    """Drive one Step stream frame by frame; returns (outputs, batch sizes, pieces ok)."""
    if after is not None:
        await after.wait()
    call = stub.Step()
    await call.write(step_open(sid, sampling, seed, replay))
    outs, batches = [], []
    for i, c in enumerate(codes):
        await call.write(step_frame(first + i, c))
        o = await call.read()
        assert o.index == first + i
        outs.append(o)
        batches.append(o.timing.batch_size)
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    return outs, batches


async def start(lm_tok, **options):
    return await start_lm_server(ServerConfig(), LmOptions(**options), load_model=lambda: lm_tok)


@pytest.mark.slow
async def test_concurrent_sessions_equal_solo_runs(tiny_lm) -> None:
    lm, tok = tiny_lm
    card = lm.config.card
    sampled = common_pb2.SamplingParams(
        text_temperature=0.8, text_top_k=10, audio_temperature=0.9, audio_top_k=20
    )
    plan = {  # sid: (seed of inputs, steps, sampling, sampling seed)
        "a": (1, 7, GREEDY, None),
        "b": (2, 5, sampled, 1234),
        "c": (3, 3, GREEDY, None),
        "d": (4, 4, sampled, 99),  # takes c's slot once c left
    }
    inputs = {sid: user_codes(s, n, card) for sid, (s, n, _, _) in plan.items()}
    running = await start(tiny_lm, max_sessions=3, max_wait_ms=20)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            c_done = asyncio.Event()

            async def run(sid):
                _, _, sampling, seed = plan[sid]
                out = await session(
                    stub,
                    sid,
                    inputs[sid],
                    sampling=sampling,
                    seed=seed,
                    after=c_done if sid == "d" else None,
                )
                if sid == "c":
                    c_done.set()
                return out

            # The first steps of a, b and c share one tick, whatever their arrival times:
            # the scheduler runs no tick until all three are queued.
            scheduler = running.servicer.engine.scheduler
            scheduler.hold()
            sessions = asyncio.gather(*(run(s) for s in plan))
            await until_queued(scheduler, 3)
            scheduler.release_hold()
            results = dict(zip(plan, await sessions))
        assert [results[s][1][0] for s in "abc"] == [3, 3, 3]  # sessions shared a step
        for sid, (_, _, sampling, seed) in plan.items():
            outs, _ = results[sid]
            assert [as_tuple(o) for o in outs] == solo(lm, inputs[sid], sampling, seed), sid
            for o in outs:
                assert o.text_piece == (tok.piece(o.text_token) if o.ready else "")
            assert not outs[0].ready and outs[-1].ready  # the acoustic delay
        assert running.servicer.engine.scheduler.slots_in_use == 0
    finally:
        await running.stop(0)


@pytest.mark.slow
async def test_replay_continues_a_session_exactly(tiny_lm) -> None:
    """Failover: replaying the history on a fresh slot continues the session bit-exactly."""
    lm, _ = tiny_lm
    codes = user_codes(7, 9, lm.config.card)
    sampled = common_pb2.SamplingParams(
        text_temperature=0.7, text_top_k=5, audio_temperature=0.8, audio_top_k=8
    )
    cut = 5
    running = await start(tiny_lm, max_sessions=2)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            for sampling, seed in ((GREEDY, None), (sampled, 42)):
                original, _ = await session(stub, "orig", codes, sampling=sampling, seed=seed)
                history = []
                for c, o in zip(codes[:cut], original[:cut]):
                    step = lm_pb2.ReplayStep(user_codes=c)
                    if o.ready:
                        step.text_token = o.text_token
                        step.moshi_codes.extend(o.moshi_codes)
                    history.append(step)
                resumed, _ = await session(
                    stub,
                    "moved",
                    codes[cut:],
                    sampling=sampling,
                    seed=seed,
                    replay=history,
                    first=cut,
                )
                assert [as_tuple(o) for o in resumed] == [as_tuple(o) for o in original[cut:]]
        metrics = await asyncio.to_thread(fetch, running.metrics_url)
    finally:
        await running.stop(0)
    values = {
        s.name: s.value
        for fam in text_string_to_metric_families(metrics)
        for s in fam.samples
        if not s.labels
    }
    assert values["moshi_lm_replayed_steps_total"] == 2 * cut
    # each resumed session: one prefill of cut - max_delay steps (one scheduler item), the
    # last max_delay history steps as ordinary steps, then its live frames
    prefilled = cut - lm.config.max_delay
    per_session = len(codes) + 1 + (cut - prefilled) + len(codes) - cut
    assert values["moshi_lm_frames_total"] == 2 * per_session
    assert values["moshi_lm_streams_started_total"] == 4


async def expect_error(call, code: grpc.StatusCode, *needles: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == code, info.value.details()
    for needle in needles:
        assert needle in info.value.details(), info.value.details()


async def test_bad_inputs_get_their_status_and_others_keep_going() -> None:
    running = await start_lm_server(ServerConfig(), LmOptions(model="echo", max_sessions=2))
    S = grpc.StatusCode
    ok = [1] * 8
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            bystander = stub.Step()
            await bystander.write(step_open("bystander"))
            step = 0

            async def bystander_step():
                nonlocal step
                await bystander.write(step_frame(step, [step % 2048] * 8))
                out = await bystander.read()
                assert out.index == step
                if step >= 1:  # echo: Moshi's codes are the user's of the previous step
                    assert list(out.moshi_codes) == [(step - 1) % 2048] * 8
                step += 1

            await bystander_step()
            bad_sampling = [
                (common_pb2.SamplingParams(text_temperature=-1), "text_temperature"),
                (common_pb2.SamplingParams(audio_temperature=float("nan")), "audio_temperature"),
                (common_pb2.SamplingParams(text_top_k=-3), "text_top_k"),
            ]
            cases = [
                (iter([step_frame(0, ok)]), S.FAILED_PRECONDITION, ["open"]),
                (iter([step_open("x"), step_open("x")]), S.FAILED_PRECONDITION, ["second"]),
                (iter([step_open("x"), step_frame(1, ok)]), S.FAILED_PRECONDITION, ["expected 0"]),
                (iter([step_open("x"), step_frame(0, [1] * 9)]), S.INVALID_ARGUMENT, ["8 codes"]),
                (
                    iter([step_open("x"), step_frame(0, [1] * 7 + [4096])]),
                    S.INVALID_ARGUMENT,
                    ["codes[7] = 4096"],
                ),
                (
                    iter(
                        [step_open("x", replay=[lm_pb2.ReplayStep(user_codes=ok, moshi_codes=ok)])]
                    ),
                    S.INVALID_ARGUMENT,
                    ["replay[0].moshi_codes"],
                ),
                (
                    iter([step_open("x", replay=[lm_pb2.ReplayStep(user_codes=[1])])]),
                    S.INVALID_ARGUMENT,
                    ["replay[0].user_codes"],
                ),
                (
                    iter(
                        [
                            step_open(
                                "x",
                                replay=[
                                    lm_pb2.ReplayStep(
                                        user_codes=ok, text_token=10**6, moshi_codes=ok
                                    )
                                ],
                            )
                        ]
                    ),
                    S.INVALID_ARGUMENT,
                    ["text_token"],
                ),
            ] + [
                (iter([step_open("x", sampling=p)]), S.INVALID_ARGUMENT, ["sampling", name])
                for p, name in bad_sampling
            ]
            for requests, code, needles in cases:
                await expect_error(stub.Step(requests), code, *needles)
                await bystander_step()
            # capacity: the bystander holds one slot, one more fits, the third is refused
            holder = stub.Step()
            await holder.write(step_open("holder"))
            await holder.write(step_frame(0, ok))
            await holder.read()
            await expect_error(
                stub.Step(iter([step_open("extra")])), S.RESOURCE_EXHAUSTED, "slots are in use"
            )
            await bystander_step()
            info = await stub.Info(common_pb2.InfoRequest())
            assert info.slots_in_use == 2 and info.slots_total == 2
            assert info.model_name == "moshi-lm-echo" and info.text_vocab_size == 32000
            await holder.done_writing()
            await bystander.done_writing()
            assert await bystander.code() == S.OK
            assert await holder.code() == S.OK
    finally:
        await running.stop(0)


async def test_info_reports_warmed_up_buckets_from_the_first_serving_moment(tiny_lm) -> None:
    """Every bucket of the default ladder ran before SERVING; Info carries its time, then
    recent step times of the buckets traffic used."""
    running = await start(tiny_lm)  # default max_sessions
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            info = await stub.Info(common_pb2.InfoRequest())
            assert [b.batch_size for b in info.buckets] == [1, 2, 4, 8, 16]
            assert info.slots_total == 16
            assert all(b.stage == "step" and b.warm_ms > 0 for b in info.buckets)
            assert all(b.recent_count == 0 for b in info.buckets)
            await session(stub, "one", user_codes(1, 3, tiny_lm[0].config.card))
            info = await stub.Info(common_pb2.InfoRequest())
            counts = {b.batch_size: b.recent_count for b in info.buckets}
            assert counts[1] == 3 and sum(counts.values()) == 3  # one session: bucket 1
    finally:
        await running.stop(0)


async def test_sessions_after_idle_probes_equal_solo_runs(tiny_lm) -> None:
    """Idle probes step the generator on free rows between sessions: sessions opened after
    several of them (greedy and seeded sampling) still equal fresh solo runs."""
    lm, _ = tiny_lm
    card = lm.config.card
    sampled = common_pb2.SamplingParams(
        text_temperature=0.8, text_top_k=10, audio_temperature=0.9, audio_top_k=20
    )
    running = await start(tiny_lm, max_sessions=4, max_wait_ms=0.0, idle_probe_s=0.01)
    scheduler = running.servicer.engine.scheduler
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = lm_pb2_grpc.LMStub(ch)
            await session(stub, "before", user_codes(9, 4, card), sampling=sampled, seed=5)
            for _ in range(2000):  # hang detector: every bucket probed twice
                if scheduler.idle_probes >= 2 * len(scheduler.runner.ladder):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("no idle probes ran")
            greedy_codes, sampled_codes = user_codes(1, 6, card), user_codes(2, 6, card)
            (greedy, _), (drawn, _) = await asyncio.gather(
                session(stub, "g", greedy_codes),
                session(stub, "s", sampled_codes, sampling=sampled, seed=1234),
            )
    finally:
        await running.stop(0)
    assert [as_tuple(o) for o in greedy] == solo(lm, greedy_codes, GREEDY, None)
    assert [as_tuple(o) for o in drawn] == solo(lm, sampled_codes, sampled, 1234)
