"""What the README promises of `moshi-grpc gateway`'s flags: each flag reaches the setting it
names (and from there the replica pool and the backend channels), bad values are refused
with the flag's name, and `--flow-window-frames` changes how many frames of a pre-recorded
session are at the backends at once."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np
import pytest
from svc_harness import float32_session
from tls_certs import make_pki

from moshi_grpc.services.codec.engine import CodecOptions
from moshi_grpc.services.codec.startup import start_codec_server
from moshi_grpc.services.common.server import ServerConfig
from moshi_grpc.services.gateway import cli
from moshi_grpc.services.gateway import flags as gateway_flags
from moshi_grpc.services.gateway.config import CostSettings, GatewaySettings
from moshi_grpc.services.gateway.text_policy import WordListPolicy
from moshi_grpc.services.lm.engine import LmOptions
from moshi_grpc.services.lm.startup import start_lm_server
from moshi_grpc.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, lm_pb2_grpc

BACKENDS = ["--codec-addr", "127.0.0.1:1", "--lm-addr", "127.0.0.1:2"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args([*BACKENDS, *argv])


def _cfg(**kw) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=None, **kw)


def test_every_session_and_admission_flag_reaches_its_setting(tmp_path) -> None:
    """Each flag at a value other than its default lands in the field it names; a flag
    read into the wrong field (or not at all) shows as that field left at its default."""
    rules = tmp_path / "rules.txt"
    rules.write_text("redact darn\nend re:forbidden\n")
    given = {
        "--budget-ms": ("default_budget_ms", 321),
        "--max-consecutive-misses": ("default_max_consecutive_misses", 7),
        "--max-backlog-frames": ("max_backlog_frames", 5),
        "--flow-window-frames": ("flow_window_frames", 6),
        "--batch-wait-ms": ("cost.batch_wait_ms", 2.5),
        "--unmeasured-stage-ms": ("cost.unmeasured_stage_ms", 33.0),
        "--cost-sample-ttl-s": ("cost.sample_ttl_s", 12.0),
        "--retry-after-ms": ("retry_after_ms", 4321),
        "--max-session-s": ("max_session_s", 90.0),
        "--max-sessions-per-client": ("max_sessions_per_client", 3),
        "--lm-history-steps": ("lm_history_steps", 100),
        "--refresh-interval-s": ("refresh_interval_s", 0.7),
        "--idle-timeout-s": ("idle_timeout_s", 17.0),
        "--resample-quality": ("resample_quality", "VHQ"),
        "--backend-streams": ("backend_streams", "per-session"),
        "--mux-coalesce-ms": ("mux_coalesce_ms", 1.5),
        "--voice-dir": ("voice_dir", str(tmp_path)),
        "--max-voice-s": ("max_voice_s", 12.5),
        "--open-answer-timeout-s": ("open_answer_timeout_s", 7.0),
    }
    default = GatewaySettings()
    argv = [f"{flag}={value}" for flag, (_, value) in given.items()]
    settings = cli.settings_from_args(_args(*argv, "--no-lm-failover", "--text-policy", str(rules)))

    def read(obj, path: str):
        for name in path.split("."):
            obj = getattr(obj, name)
        return obj

    for flag, (field, value) in given.items():
        assert read(default, field) != value, f"{flag}: pick a value other than the default"
        assert read(settings, field) == value, flag
    assert default.lm_failover and not settings.lm_failover
    assert default.text_policy is None and isinstance(settings.text_policy, WordListPolicy)
    assert len(settings.text_policy.rules) == 2
    module = cli.settings_from_args(
        _args("--text-policy", "moshi_grpc.services.gateway.text_policy:WordListPolicy")
    )
    assert isinstance(module.text_policy, WordListPolicy) and not module.text_policy.rules
    # The defaults are the settings' own.
    assert cli.settings_from_args(_args()) == default


@pytest.mark.parametrize(
    "bad",
    [
        "--budget-ms=0",
        "--max-backlog-frames=0",
        "--flow-window-frames=0",
        "--batch-wait-ms=-1",
        "--unmeasured-stage-ms=-1",
        "--cost-sample-ttl-s=0",
        "--max-voice-s=0",
        "--open-answer-timeout-s=0",
    ],
)
def test_bad_flag_values_are_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match=bad.split("=")[0]):
        cli.settings_from_args(_args(bad))


async def test_admission_flags_reach_the_replica_pool() -> None:
    """--batch-wait-ms, --unmeasured-stage-ms, --cost-sample-ttl-s and --retry-after-ms are
    what the running gateway's pool predicts and refuses with."""
    codec = await start_codec_server(_cfg(), CodecOptions(model="echo", max_sessions=2))
    lm = await start_lm_server(_cfg(), LmOptions(model="echo", max_sessions=2))
    args = _args(
        "--batch-wait-ms=2.5",
        "--unmeasured-stage-ms=33",
        "--cost-sample-ttl-s=12",
        "--retry-after-ms=4321",
    )
    gateway = await start_gateway_from(args, codec.address, lm.address)
    try:
        admission = gateway.admission
        want = CostSettings(batch_wait_ms=2.5, unmeasured_stage_ms=33.0, sample_ttl_s=12.0)
        assert admission.cost == want
        assert all(s.cost == want for s in gateway.pool.sets.values())
        assert admission.retry_after_ms == 4321
    finally:
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)


async def start_gateway_from(args: argparse.Namespace, codec: str, lm: str):
    return await cli.start_gateway(
        _cfg(), codec, lm, cli.settings_from_args(args), cli.channels_from_args(args)
    )


async def test_backend_tls_flags_reach_the_channels_and_connect(tmp_path, monkeypatch) -> None:
    """--backend-tls-ca/-cert/-key/-server-name and --backend-auth-token give the channel
    settings those bytes, that name and that token; with them the gateway's channel reaches
    an LM that requires mTLS and the token. The name checked against the certificate is the
    flag's: `localhost` (in the certificate) connects, `localhost-alias` does not."""
    pki = make_pki(tmp_path)
    monkeypatch.delenv(gateway_flags.BACKEND_AUTH_ENV, raising=False)

    def tls_args(server_name: str) -> argparse.Namespace:
        return _args(
            "--backend-tls-ca", str(pki.path("ca.crt")),
            "--backend-tls-cert", str(pki.path("client.crt")),
            "--backend-tls-key", str(pki.path("client.key")),
            "--backend-tls-server-name", server_name,
            "--backend-auth-token", "s3cret",
        )  # fmt: skip

    channels = cli.channels_from_args(tls_args("localhost"))
    assert channels.tls_ca == pki.ca.cert_pem
    assert (channels.tls_client_cert, channels.tls_client_key) == (
        pki.client.cert_pem,
        pki.client.key_pem,
    )
    assert ("grpc.ssl_target_name_override", "localhost") in channels.options
    assert channels.metadata() == (("authorization", "Bearer s3cret"),)
    plain = cli.channels_from_args(_args())
    assert plain.tls_ca is None and plain.tls_client_cert is None and not plain.metadata()
    with pytest.raises(ValueError, match="--backend-tls-cert and --backend-tls-key"):
        cli.channels_from_args(_args("--backend-tls-cert", str(pki.path("client.crt"))))
    with pytest.raises(ValueError, match="--backend-tls-ca file not found"):
        cli.channels_from_args(_args("--backend-tls-ca", str(tmp_path / "missing.pem")))

    secure = _cfg(
        tls_cert=str(pki.path("server.crt")),
        tls_key=str(pki.path("server.key")),
        tls_client_ca=str(pki.path("ca.crt")),
        auth_token="s3cret",
    )
    lm = await start_lm_server(secure, LmOptions(model="echo", max_sessions=2))
    try:
        async with channels.open(lm.address) as channel:
            info = await lm_pb2_grpc.LMStub(channel).Info(
                common_pb2.InfoRequest(), metadata=channels.metadata(), timeout=10
            )
        assert info.slots_total == 2
        wrong = cli.channels_from_args(tls_args("localhost-alias"))
        async with wrong.open(lm.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await lm_pb2_grpc.LMStub(channel).Info(
                    common_pb2.InfoRequest(), metadata=wrong.metadata(), timeout=10
                )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await lm.stop(0)


async def test_flow_window_frames_other_than_three() -> None:
    """`--flow-window-frames 5`: a pre-recorded session has exactly 5 frames at the backends
    while they do not answer (the codec's encoder held: none is answered), and has taken no
    more from the client; at the default 3 it would never get there. Released, every frame
    comes back and none is dropped."""
    assert GatewaySettings().flow_window_frames == 3
    codec = await start_codec_server(
        _cfg(), CodecOptions(model="echo", max_sessions=2, max_wait_ms=0.0)
    )
    lm = await start_lm_server(_cfg(), LmOptions(model="echo", max_sessions=2, max_wait_ms=0.0))
    args = _args("--flow-window-frames=5", "--refresh-interval-s=0.1")
    gateway = await start_gateway_from(args, codec.address, lm.address)
    encoder = codec.servicer.engine.encoder
    frames = 12
    x = np.random.default_rng(0).uniform(-0.5, 0.5, frames * 1920).astype("<f4")
    requests = float32_session(
        x,
        budget_ms=10_000,
        max_consecutive_misses=0,
        input_pacing=gateway_pb2.INPUT_PACING_FLOW_CONTROL,
    )
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            encoder.hold()
            call = gateway_pb2_grpc.GatewayStub(channel).Converse(iter(requests), timeout=60)
            replies = asyncio.ensure_future(_collect(call))
            session = await _outstanding_at_least(gateway, 5)
            assert (session.seq.outstanding, session.seq.frames_in) == (5, 5)
            encoder.release_hold()
            messages = await replies
            assert await call.code() == grpc.StatusCode.OK
    finally:
        encoder.release_hold()
        await gateway.stop(0)
        await codec.stop(0)
        await lm.stop(0)
    audio = [m.audio for m in messages if m.WhichOneof("kind") == "audio"]
    assert [a.frame_index for a in audio] == list(range(frames))
    (summary,) = [m.event.ended.summary for m in messages if m.event.HasField("ended")]
    assert summary.frames_in == summary.frames_out == frames and summary.frames_dropped == 0


async def _outstanding_at_least(gateway, n: int, timeout_s: float = 30.0):
    """The gateway's one session once it has `n` frames at the backends (a hang guard)."""
    async with asyncio.timeout(timeout_s):
        while True:
            sessions = list(gateway.servicer.sessions.values())
            if sessions and sessions[0].seq.outstanding >= n:
                return sessions[0]
            await asyncio.sleep(0.01)


async def _collect(call) -> list:
    return [message async for message in call]
