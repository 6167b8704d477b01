"""Admission from measured cost (services/gateway/admission.py, cost.py): the gateway predicts a new
session's frame latency from the replicas' per-bucket step times (Info.buckets) and refuses
what it cannot serve.

Backends here are tiny real gRPC servers on loopback that answer health and `Info` with
hand-made `BackendInfo` (so the figures are exact); time is a fake clock, so expiry and
decay are checked without waiting. The last test runs the real echo services instead: a
replica's idle probes (services/common/batching.py) reach admission through `Info`.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.errors import ErrorCode
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.admission import Admission, NoCapacity
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import CostSettings, GatewaySettings
from moshi_grpc.services.gateway.cost import ReplicaCost
from moshi_grpc.services.gateway.discovery import ChannelSettings, ReplicaPool, Spec
from moshi_grpc.services.gateway.moshi_pipeline import CODEC, LM, MOSHI
from moshi_grpc.services.gateway.replicas import Replica
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import codec_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, lm_pb2_grpc


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _buckets(stage: str, warm: dict[int, float], recent=None) -> list[common_pb2.BucketTiming]:
    recent = recent or {}
    return [
        common_pb2.BucketTiming(
            batch_size=b,
            stage=stage,
            warm_ms=ms,
            recent_p50_ms=recent.get(b, (0.0, 0))[0],
            recent_count=recent.get(b, (0.0, 0))[1],
        )
        for b, ms in warm.items()
    ]


class _Info:
    def __init__(self, info: common_pb2.BackendInfo) -> None:
        self.info = info

    async def Info(self, request, context):
        return self.info


class FakeLm(_Info, lm_pb2_grpc.LMServicer):
    pass


class FakeCodec(_Info, codec_pb2_grpc.CodecServicer):
    pass


async def _serve(servicer, add) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(servicer, server)
    h = health.aio.HealthServicer()
    await h.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


LM_WARM = {1: 5.0, 2: 6.0, 4: 9.0, 8: 20.0}
CODEC_WARM = {1: 1.0, 2: 1.0, 4: 1.5, 8: 2.0}


def _lm_info(recent=None, used: int = 0) -> common_pb2.BackendInfo:
    return common_pb2.BackendInfo(
        model_name="moshi-lm",
        slots_total=8,
        slots_in_use=used,
        buckets=_buckets("step", LM_WARM, recent),
    )


def _codec_info() -> common_pb2.BackendInfo:
    return common_pb2.BackendInfo(
        model_name="mimi",
        slots_total=8,
        buckets=_buckets("encode", CODEC_WARM) + _buckets("decode", CODEC_WARM),
    )


@pytest.fixture
async def backends():
    lm = FakeLm(_lm_info())
    codec = FakeCodec(_codec_info())
    lm_server, lm_addr = await _serve(lm, lm_pb2_grpc.add_LMServicer_to_server)
    codec_server, codec_addr = await _serve(codec, codec_pb2_grpc.add_CodecServicer_to_server)
    yield lm, codec, lm_addr, codec_addr
    await lm_server.stop(0)
    await codec_server.stop(0)


def _admission(lm_addr: str, codec_addr: str, clock, **cost) -> Admission:
    host, port = codec_addr.rsplit(":", 1)
    lhost, lport = lm_addr.rsplit(":", 1)
    settings = CostSettings(**cost)
    pool = ReplicaPool(
        {CODEC: [Spec(host, int(port), False)], LM: [Spec(lhost, int(lport), False)]},
        ChannelSettings(),
        clock=clock,
        cost=settings,
    )
    return Admission(pool, MOSHI, settings, retry_after_ms=500)


def _pair(admission: Admission) -> tuple[Replica, Replica]:
    sets = admission.pool.sets
    return next(iter(sets["codec"].replicas.values())), next(iter(sets["lm"].replicas.values()))


def test_bucket_ladder() -> None:
    def bucket(sessions: int, slots: int) -> int:  # where the next session would be stepped
        info = common_pb2.BackendInfo(slots_total=slots, slots_in_use=sessions - 1)
        replica = Replica(LM, "a:1", channel=None, healthy=True, info=info, stub=object())
        return replica.join_bucket

    assert [bucket(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert bucket(5, 6) == 6  # capped at the slots
    with pytest.raises(ValueError, match="at least one slot"):
        bucket(3, 0)  # a replica without slots has no bucket (and is never available)


async def test_prediction_adds_up_at_the_bucket_the_session_would_join(backends) -> None:
    lm, codec, lm_addr, codec_addr = backends
    clock = FakeClock()
    admission = _admission(lm_addr, codec_addr, clock, batch_wait_ms=5.0)
    try:
        lm.info = _lm_info(used=3)  # a 4th session lands in bucket 4
        await admission.pool.refresh()
        c, m = _pair(admission)
        est = admission.estimate({"codec": c, "lm": m})
        assert (est.buckets["lm"], est.buckets["codec"]) == (4, 1)
        assert est.stage_ms["step"] == pytest.approx(9.0) and est.phase_ms == pytest.approx(9.0)
        assert est.stage_ms["encode"] == est.stage_ms["decode"] == pytest.approx(1.0)
        assert est.wait_ms == pytest.approx(15.0)
        assert est.network_ms > 0  # the measured Info round trips
        expected = 1.0 + 9.0 + 1.0 + 15.0 + 9.0 + est.network_ms
        assert est.total_ms == pytest.approx(expected)
    finally:
        await admission.pool.stop()


async def test_replica_admits_again_once_a_burst_is_over(backends) -> None:
    """During a burst the LM reports slow recent steps: a 100 ms budget is refused with a
    retry hint that points at when those samples expire. The backend's own window never
    forgets them (it keeps reporting the same figures), but the gateway's samples expire:
    after the TTL the same replica admits the same request."""
    lm, codec, lm_addr, codec_addr = backends
    clock = FakeClock()
    admission = _admission(lm_addr, codec_addr, clock, sample_ttl_s=30.0)
    try:
        await admission.pool.refresh()
        admission.lease(100).release()  # idle: warm-up times fit
        lm.info = _lm_info(recent={1: (80.0, 40)})  # the burst
        await admission.pool.refresh()
        with pytest.raises(NoCapacity, match="cannot meet the 100 ms budget") as err:
            admission.lease(100)
        assert err.value.reason == "budget"
        assert err.value.code == ErrorCode.NO_CAPACITY  # RESOURCE_EXHAUSTED on the wire
        assert 29_000 <= err.value.retry_after_ms <= 30_000  # when the samples expire
        clock.t += 15.0
        await admission.pool.refresh()  # same figures: no new steps, no new sample
        with pytest.raises(NoCapacity):
            admission.lease(100)
        clock.t += 15.1
        await admission.pool.refresh()
        admission.lease(100).release()  # the burst is over: admitted again
    finally:
        await admission.pool.stop()


async def test_fresh_replica_refuses_a_1ms_budget(backends) -> None:
    lm, codec, lm_addr, codec_addr = backends
    admission = _admission(lm_addr, codec_addr, FakeClock())
    try:
        await admission.pool.refresh()
        with pytest.raises(NoCapacity, match="cannot meet the 1 ms budget") as err:
            admission.lease(1)
        # It never could, even idle: the hint is the default, not an expiry.
        assert err.value.retry_after_ms == 500
        admission.lease(200).release()
    finally:
        await admission.pool.stop()


def test_recent_samples_decay_and_expire() -> None:
    cost = ReplicaCost(LM, CostSettings(sample_ttl_s=30.0))
    info = _lm_info(recent={1: (50.0, 10)})
    cost.update(info, now=0.0, rtt_ms=1.0)
    assert cost.stage_ms("step", 1, now=0.0) == pytest.approx(50.0)
    cost.update(_lm_info(recent={1: (10.0, 20)}), now=10.0, rtt_ms=1.0)
    # Weights halve every 10 s: (0.5 * 50 + 1 * 10) / 1.5
    assert cost.stage_ms("step", 1, now=10.0) == pytest.approx(35.0 / 1.5)
    # Bucket 2 has no recent sample: warm-up time scaled by how slow bucket 1 runs now.
    slowdown = (35.0 / 1.5) / LM_WARM[1]
    assert cost.stage_ms("step", 2, now=10.0) == pytest.approx(LM_WARM[2] * slowdown)
    assert cost.stage_ms("step", 1, now=10.0, recent=False) == LM_WARM[1]
    assert cost.stage_ms("step", 1, now=40.0) == pytest.approx(LM_WARM[1])  # all expired


def test_unmeasured_replica_rule() -> None:
    """No bucket timings (an older backend): each stage costs `unmeasured_stage_ms`, or the
    replica's reported step p50 while it keeps changing (steps ran), until it expires."""
    cost = ReplicaCost(LM, CostSettings(unmeasured_stage_ms=10.0, sample_ttl_s=30.0))
    old = common_pb2.BackendInfo(slots_total=4)
    cost.update(old, now=0.0, rtt_ms=0.5)
    assert not cost.measured and cost.stage_ms("step", 1, now=0.0) == 10.0
    cost.update(common_pb2.BackendInfo(slots_total=4, step_p50_ms=70.0), now=1.0, rtt_ms=0.5)
    assert cost.stage_ms("step", 1, now=1.0) == pytest.approx(70.0)
    cost.update(common_pb2.BackendInfo(slots_total=4, step_p50_ms=70.0), now=40.0, rtt_ms=0.5)
    assert cost.stage_ms("step", 1, now=40.0) == 10.0  # unchanged figure: expired
    codec = ReplicaCost(CODEC, CostSettings())
    codec.update(common_pb2.BackendInfo(slots_total=4, step_p50_ms=8.0), now=0.0, rtt_ms=0.5)
    assert codec.stage_ms("encode", 1, now=0.0) == pytest.approx(4.0)  # encode + decode


async def test_idle_replica_with_a_busy_warm_up_is_admitted_once_its_probes_run_fast() -> None:
    """Real services end to end: an LM replica whose warm-up was timed while a neighbour
    loaded (every bucket ~300 ms, so a 200 ms budget is refused) becomes admissible again
    with no traffic at all once the neighbour is quiet: its idle probes re-time the buckets
    and the gateway reads them from Info. While the neighbour stays busy, it stays refused."""
    cfg = ServerConfig(host="127.0.0.1", port=0)
    codec = await start_codec_server(cfg, CodecOptions(model="echo", max_wait_ms=0.0))
    # probes start once the busy warm-up is in place (one in flight would race with it)
    lm = await start_lm_server(cfg, LmOptions(model="echo", max_wait_ms=0.0, idle_probe_s=0.0))
    scheduler = lm.servicer.engine.scheduler
    step = scheduler.runner.warm_up
    busy = True

    def warm_up(bucket: int) -> float:  # the neighbour shares the cores while it is busy
        return step(bucket) + (0.3 if busy else 0.0)

    scheduler.runner.warm_up = warm_up
    scheduler.warm_ms.update(dict.fromkeys(scheduler.warm_ms, 300.0))  # the busy warm-up
    scheduler.idle_probe_s = 0.02
    gateway = await start_gateway(
        cfg, codec.address, lm.address, GatewaySettings(refresh_interval_s=0.05)
    )

    async def open_session() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(gateway.address) as ch:
            call = gateway_pb2_grpc.GatewayStub(ch).Converse()
            await call.write(
                gateway_pb2.ConverseRequest(
                    config=gateway_pb2.SessionConfig(
                        sample_rate=24000, encoding=gateway_pb2.AUDIO_ENCODING_FLOAT32
                    )
                )
            )
            await call.done_writing()
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return await call.code()

    try:
        probes = scheduler.idle_probes
        for _ in range(2000):  # hang detector: slow probes ran, and healed nothing
            if scheduler.idle_probes >= probes + 3:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the idle replica never probed")
        assert await open_session() == grpc.StatusCode.RESOURCE_EXHAUSTED
        busy = False
        for _ in range(400):  # hang detector: admitted once a fast probe reached the gateway
            if await open_session() == grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the idle replica was never admitted again")
        assert scheduler.warm_ms[1] < 300.0
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)


async def test_a_session_that_left_since_the_last_info_is_not_counted(backends) -> None:
    """Back to back: a client's session ends and its next one starts before the next Info
    poll. The replica's last count still holds the first session; the gateway knows it left,
    so the next one is predicted at bucket 1, not 2 (where recent slow samples, or simply a
    larger bucket, could refuse it for nothing)."""
    lm, codec, lm_addr, codec_addr = backends
    clock = FakeClock()
    admission = _admission(lm_addr, codec_addr, clock)
    try:
        await admission.pool.refresh()
        first = admission.lease(200)
        clock.t += 1.0
        lm.info = _lm_info(used=1)  # the backend counts the first session
        codec.info.slots_in_use = 1  # its Encode and Decode streams hold one slot each
        await admission.pool.refresh()
        c, m = _pair(admission)
        assert (m.slots_used, c.slots_used) == (1, 1)
        clock.t += 0.1
        first.release()  # before the next poll: the last Info still counts it
        assert (m.slots_used, c.slots_used) == (0, 0)
        est = admission.estimate({"codec": c, "lm": m})
        assert (est.buckets["lm"], est.buckets["codec"]) == (1, 1)
        second = admission.lease(200)  # placed, then counted once, on top of the stale count
        assert (m.slots_used, c.slots_used) == (1, 1)
        clock.t += 0.5
        await admission.pool.refresh()  # the backend's fresh count: the second session only
        assert (m.slots_used, c.slots_used) == (1, 1)
        assert not m.recent_releases and not m.recent_leases
        clock.t += 0.1
        second.release()
        assert (m.slots_used, c.slots_used) == (0, 0)
    finally:
        await admission.pool.stop()
