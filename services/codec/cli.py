"""`moshi-grpc codec`: run the Mimi codec service (batched Encode/Decode)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from moshi_grpc.services.common import flags, logs

log = logging.getLogger(__name__)


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
        num_codebooks=args.num_codebooks,
        max_sessions=args.max_sessions,
        max_wait_ms=args.max_wait_ms,
        inject_delay_ms=args.inject_delay_ms,
    )


async def _main(args: argparse.Namespace) -> int:
    from moshi_grpc.services.codec.service import start_codec_server

    config = flags.server_config_from_args(args)
    running = await start_codec_server(config, options_from_args(args), wait_ready=False)
    running.install_signal_handlers()
    log.info("codec listening on %s", running.address)
    try:
        await running.ready
    except Exception as exc:  # noqa: BLE001 - reported, exit code 1
        log.error("codec: could not load the model: %s", exc)
        return 1
    await running.wait_closed()
    return 0


def run(args: argparse.Namespace) -> int:
    logs.install(json_logs=args.json_logs)
    try:
        if args.model == "real":
            flags.resolve_weights(args, "codec")
        if args.max_sessions < 1:
            raise ValueError(f"--max-sessions must be >= 1, got {args.max_sessions}")
        return asyncio.run(_main(args))
    except ValueError as exc:
        log.error("codec: %s", exc)
        return 2
