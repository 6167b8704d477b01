"""`moshi-grpc lm`: run the Moshi LM service (batched Step)."""

from __future__ import annotations

import argparse
from typing import Any

from moshi_grpc.services.common import flags
from moshi_grpc.services.common.backend import run_backend_cli
from moshi_grpc.services.common.server import RunningServer, ServerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_server_flags(parser, "lm")
    flags.add_batching_flags(parser)
    flags.add_model_flags(parser, "lm")


def options_from_args(args: argparse.Namespace):
    from moshi_grpc.services.lm.engine import LmOptions

    return LmOptions(
        model=args.model,
        weights=args.moshi_weights,
        config=args.lm_config or ("moshiko-7b" if args.moshi_weights else "small"),
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        max_sessions=args.max_sessions,
        max_wait_ms=args.max_wait_ms,
        inject_delay_ms=args.inject_delay_ms,
        idle_probe_s=args.idle_probe_s,
        cuda_graphs=args.cuda_graphs,
        cpu_forms=args.cpu_forms,
        prefix_cache_mib=args.prefix_cache_mib,
    )


async def _start(config: ServerConfig, options: Any, **kwargs: Any) -> RunningServer:
    # Imported here: the service pulls in torch, and `--help` should stay fast.
    from moshi_grpc.services.lm.startup import start_lm_server

    return await start_lm_server(config, options, **kwargs)


def run(args: argparse.Namespace) -> int:
    return run_backend_cli(args, "lm", _start, options_from_args)
