"""README promises of every service's flags and endpoints that no other test checks:

- `--dtype bfloat16` on `lm` and `codec`: the flag reaches the service, whose Info and
  `moshi_build_info` say bfloat16, and whose output is the bfloat16 model's, token for token
  and code for code (the same model run directly in this process);
- server reflection on the LM and the gateway (the codec's is in test_service_common.py);
- `--json-logs`: every line a service logs is one JSON object, and a session's lines carry
  its session id.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import grpc
import numpy as np
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from svc_harness import ServiceProcess, float32_session

from moshi_grpc.services.codec import cli as codec_cli
from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway.cli import start_gateway
from moshi_grpc.services.gateway.config import GatewaySettings
from moshi_grpc.services.lm import cli as lm_cli
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import (
    codec_pb2,
    codec_pb2_grpc,
    common_pb2,
    gateway_pb2_grpc,
    lm_pb2,
    lm_pb2_grpc,
)

FRAME = 1920


def _cfg(**kw) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, **kw)


def _options(cli_module, *argv: str):
    parser = argparse.ArgumentParser()
    cli_module.add_arguments(parser)
    return cli_module.options_from_args(parser.parse_args(list(argv)))


def _build_info(registry) -> dict[str, str]:
    (sample,) = [
        s
        for family in registry.collect()
        if family.name == "moshi_build_info"
        for s in family.samples
    ]
    return sample.labels


# --------------------------------------------------------------------------- --dtype bfloat16


async def test_lm_service_dtype_bfloat16_flag() -> None:
    from moshi_grpc.models.lm import load_lm
    from moshi_grpc.models.lm_gen import LMGen, SamplingConfig

    # forms pinned off: the service's tokens are compared with the plain bf16 model's
    options = _options(
        lm_cli, "--dtype", "bfloat16", "--lm-config", "tiny", "--cpu-forms", "off",
        "--max-sessions", "2", "--max-wait-ms", "0",
    )  # fmt: skip
    assert (options.dtype, options.config) == ("bfloat16", "tiny")
    lm = load_lm(None, config="tiny", dtype=torch.bfloat16, seed=options.seed)
    assert next(lm.parameters()).dtype == torch.bfloat16
    running = await start_lm_server(_cfg(metrics_port=0), options)
    steps = 10
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, lm.config.card, (steps, lm.config.num_user_streams), generator=g)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = lm_pb2_grpc.LMStub(channel)
            info = await stub.Info(common_pb2.InfoRequest())
            greedy = common_pb2.SamplingParams(
                text_temperature=0, text_top_k=0, audio_temperature=0, audio_top_k=0
            )
            requests = [lm_pb2.StepRequest(open=lm_pb2.LmOpen(session_id="bf16", sampling=greedy))]
            requests += [
                lm_pb2.StepRequest(frame=lm_pb2.UserCodes(index=i, codes=codes[i].tolist()))
                for i in range(steps)
            ]
            outs = [o async for o in stub.Step(iter(requests))]
        labels = _build_info(running.registry)
    finally:
        await running.stop(0)
    assert info.dtype == "bfloat16" and labels["dtype"] == "bfloat16"
    gen = LMGen(lm, 1)
    gen.reset(0, SamplingConfig.greedy(), seed=None)
    direct = []
    for i in range(steps):
        r = gen.step(codes[i][None])
        direct.append((int(r.text[0]), r.audio[0].tolist()) if bool(r.ready[0]) else None)
    served = [(o.text_token, list(o.moshi_codes)) if o.ready else None for o in outs]
    assert served == direct
    assert any(step is not None for step in served)


async def test_codec_service_dtype_bfloat16_flag() -> None:
    from moshi_grpc.models.mimi import load_mimi

    options = _options(
        codec_cli, "--dtype", "bfloat16", "--mimi-config", "tiny", "--cpu-forms", "off",
        "--max-sessions", "2", "--max-wait-ms", "0",
    )  # fmt: skip
    assert (options.dtype, options.config) == ("bfloat16", "tiny")
    running = await start_codec_server(_cfg(metrics_port=0), options)
    rng = np.random.default_rng(0)
    frames = (0.3 * rng.standard_normal((4, FRAME))).astype(np.float32)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = codec_pb2_grpc.CodecStub(channel)
            info = await stub.Info(common_pb2.InfoRequest())
            requests = [codec_pb2.EncodeRequest(open=codec_pb2.CodecOpen(session_id="bf16"))]
            requests += [
                codec_pb2.EncodeRequest(frame=codec_pb2.PcmFrame(index=i, pcm_f32le=f.tobytes()))
                for i, f in enumerate(frames)
            ]
            served = [list(o.codes) async for o in stub.Encode(iter(requests))]
        labels = _build_info(running.registry)
    finally:
        await running.stop(0)
    assert info.dtype == "bfloat16" and labels["dtype"] == "bfloat16"
    mimi = load_mimi(None, config="tiny", dtype=torch.bfloat16, seed=options.seed)
    enc = mimi.streaming_encoder(1)
    direct = [enc.step(torch.from_numpy(f)[None])[0].tolist() for f in frames]
    assert served == direct


# --------------------------------------------------------------------------- reflection


async def _reflected(address: str) -> tuple[set[str], set[str]]:
    """(service names listed, services in the file that defines the first moshi one)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed: set[str] = set()
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        async for resp in stub.ServerReflectionInfo(iter([req])):
            listed |= {s.name for s in resp.list_services_response.service}
        ours = sorted(n for n in listed if n.startswith("moshi_grpc.v1."))
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=ours[0])
        defined: set[str] = set()
        async for resp in stub.ServerReflectionInfo(iter([req])):
            from google.protobuf import descriptor_pb2

            for raw in resp.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                defined |= {f"{proto.package}.{s.name}" for s in proto.service}
    return listed, defined


async def test_reflection_on_the_lm_and_the_gateway() -> None:
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=2))
    lm = await start_lm_server(_cfg(), LmOptions(model="echo", max_sessions=2))
    gateway = await start_gateway(
        _cfg(), codec.address, lm.address, GatewaySettings(refresh_interval_s=0.5)
    )
    try:
        lm_listed, lm_defined = await _reflected(lm.address)
        gw_listed, gw_defined = await _reflected(gateway.address)
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
    base = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert {"moshi_grpc.v1.LM"} | base <= lm_listed
    assert "moshi_grpc.v1.Gateway" not in lm_listed
    assert "moshi_grpc.v1.LM" in lm_defined
    assert {"moshi_grpc.v1.Gateway"} | base <= gw_listed
    assert "moshi_grpc.v1.LM" not in gw_listed
    assert "moshi_grpc.v1.Gateway" in gw_defined


# --------------------------------------------------------------------------- --json-logs


async def test_json_logs_one_object_per_line_with_the_session_id(
    tmp_path, free_port_factory
) -> None:
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=2))
    lm = await start_lm_server(_cfg(), LmOptions(model="echo", max_sessions=2))
    gateway = ServiceProcess(
        "gateway",
        free_port_factory(),
        free_port_factory(),
        ["--codec-addr", codec.address, "--lm-addr", lm.address, "--json-logs"],
        tmp_path / "gateway.log",
    )
    try:
        await asyncio.to_thread(gateway.wait_serving)
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            requests = float32_session(np.zeros(2 * FRAME, "<f4"), budget_ms=5000)
            call = gateway_pb2_grpc.GatewayStub(channel).Converse(iter(requests), timeout=30)
            replies = [r async for r in call]
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await asyncio.to_thread(gateway.stop)
        await codec.stop(0)
        await lm.stop(0)
    session_id = replies[0].event.started.session_id
    lines = [line for line in gateway.logs().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(set(r) >= {"ts", "level", "logger", "msg", "session_id", "rpc"} for r in records)
    tagged = [r for r in records if r["session_id"] == session_id]
    assert any(r["msg"].startswith("session started") for r in tagged), records
    assert any(r["msg"].startswith("session ended") for r in tagged), records
    assert all(r["rpc"].endswith("Converse") for r in tagged)
    assert any(r["msg"] == "gateway stopped" for r in records)
