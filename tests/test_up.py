"""`moshi-grpc up --demo`: three real service processes, one conversation, clean shutdown."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moshi_grpc import audio


@pytest.mark.slow
def test_up_demo_writes_reply_and_transcript(tmp_path, repo_root) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "moshi_grpc.cli", "up", "--demo", str(out), "--demo-seconds", "2"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Without weights the random preset is announced loudly.
    assert "NO WEIGHTS GIVEN" in proc.stderr
    assert "all services SERVING" in proc.stdout and "demo: done" in proc.stdout
    x, in_rate = audio.read_wav(out / "input.wav")
    y, rate = audio.read_wav(out / "reply.wav")
    assert in_rate == rate == 16000
    frames = -(-len(x) * 24000 // in_rate // 1920)  # ceil: the last partial frame is padded
    assert len(y) == frames * 1280  # one 80 ms frame out per frame in, at the client's rate
    assert (out / "transcript.txt").is_file()
    assert "frames        in 25, out 25" in proc.stdout
    # Every service was shut down cleanly (drained, no traceback in their logs).
    for name in ("gateway", "codec", "lm"):
        log = (out / f"{name}.log").read_text()
        assert "Traceback" not in log, log
        assert f"{name} stopped" in log, log


def test_up_ports_are_configurable_and_ephemeral_on_request() -> None:
    """Fixed documented ports by default; explicit ports as given; 0 (or --demo, or a gRPC
    port 0) picks free ports, so tests never collide on the metrics ports."""
    import argparse

    from moshi_grpc.services import up

    def ports(*argv: str, demo: bool = False) -> dict:
        parser = argparse.ArgumentParser()
        up.add_arguments(parser)
        args = parser.parse_args(list(argv))
        return {name: up._choose_ports(args, name, demo) for name in up.DEFAULT_PORTS}

    assert ports() == up.DEFAULT_PORTS
    chosen = ports("--lm-port", "6000", "--lm-metrics-port", "7000", "--codec-metrics-port", "0")
    assert chosen["lm"] == (6000, 7000) and chosen["gateway"] == (50051, 9091)
    assert chosen["codec"][0] == 50052 and chosen["codec"][1] not in (0, 9092)
    free = ports("--gateway-port", "0")["gateway"]
    assert 0 not in free and free[1] != 9091  # gRPC port 0: metrics port free too
    demo = ports(demo=True)
    assert all(0 not in p and p[1] not in (9091, 9092, 9093) for p in demo.values())
    assert ports("--gateway-metrics-port", "9999", demo=True)["gateway"][1] == 9999
    with pytest.raises(ValueError, match="--lm-metrics-port"):
        ports("--lm-metrics-port", "70000")


def test_up_passes_its_backend_flags_to_each_service_and_each_service_accepts_them() -> None:
    """What `up` forwards must be flags the service parses to the same values (a flag
    added to the services but not forwarded would silently run the default)."""
    import argparse

    from moshi_grpc.services import up
    from moshi_grpc.services.codec import cli as codec_cli
    from moshi_grpc.services.lm import cli as lm_cli

    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    argv = ["--cpu-forms", "off", "--cuda-graphs", "off", "--max-sessions", "3"]
    args = parser.parse_args([*argv, "--otel-endpoint", "http://127.0.0.1:4317"])
    for name, service_cli in (("codec", codec_cli), ("lm", lm_cli)):
        service = argparse.ArgumentParser()
        service_cli.add_arguments(service)
        got = service.parse_args(up._service_args(args, name))
        assert (got.cpu_forms, got.cuda_graphs, got.max_sessions) == ("off", "off", 3), name
        assert got.otel_endpoint == "http://127.0.0.1:4317", name


def test_up_backends_get_the_same_defaults_as_backends_started_alone() -> None:
    """`up` with no flags must run the codec and LM as operators run them (same slots,
    same forms), or a local try-out would measure a different replica."""
    import argparse

    from moshi_grpc.services import up
    from moshi_grpc.services.codec import cli as codec_cli
    from moshi_grpc.services.lm import cli as lm_cli

    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    args = parser.parse_args([])
    for name, service_cli in (("codec", codec_cli), ("lm", lm_cli)):
        service = argparse.ArgumentParser()
        service_cli.add_arguments(service)
        via_up = service.parse_args(up._service_args(args, name))
        alone = service.parse_args([])
        for flag in ("max_sessions", "cpu_forms", "cuda_graphs", "max_wait_ms"):
            assert getattr(via_up, flag) == getattr(alone, flag), (name, flag)


def test_up_passes_the_voice_directory_to_the_gateway(tmp_path) -> None:
    """`up --voice-dir DIR` is the gateway's `--voice-dir DIR` (persona sessions' voices);
    without it the gateway has none."""
    import argparse

    from moshi_grpc.services import up
    from moshi_grpc.services.gateway import cli as gateway_cli

    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    backends = ["--codec-addr", "127.0.0.1:1", "--lm-addr", "127.0.0.1:2"]
    for argv, want in (([], None), (["--voice-dir", str(tmp_path)], str(tmp_path))):
        gateway = argparse.ArgumentParser()
        gateway_cli.add_arguments(gateway)
        got = gateway.parse_args([*up._service_args(parser.parse_args(argv), "gateway"), *backends])
        assert gateway_cli.settings_from_args(got).voice_dir == want
