"""`moshi-grpc codec`: run the Mimi codec service (batched Encode/Decode)."""

from __future__ import annotations

import argparse
from typing import Any

from moshi_grpc.services.common import flags
from moshi_grpc.services.common.backend import run_backend_cli
from moshi_grpc.services.common.server import RunningServer, ServerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_server_flags(parser, "codec")
    flags.add_batching_flags(parser)
    flags.add_model_flags(parser, "codec")


def options_from_args(args: argparse.Namespace):
    from moshi_grpc.services.codec.engine import CodecOptions

    return CodecOptions(
        model=args.model,
        weights=args.mimi_weights,
        config=args.mimi_config or "mimi",
        device=args.device,
        dtype=args.dtype,
        cpu_forms=args.cpu_forms,
        num_codebooks=args.num_codebooks,
        max_sessions=args.max_sessions,
        max_wait_ms=args.max_wait_ms,
        inject_delay_ms=args.inject_delay_ms,
        idle_probe_s=args.idle_probe_s,
        cuda_graphs=args.cuda_graphs,
    )


async def _start(config: ServerConfig, options: Any, **kwargs: Any) -> RunningServer:
    # Imported here: the service pulls in torch, and `--help` should stay fast.
    from moshi_grpc.services.codec.startup import start_codec_server

    return await start_codec_server(config, options, **kwargs)


def run(args: argparse.Namespace) -> int:
    return run_backend_cli(args, "codec", _start, options_from_args)
