"""`moshi-grpc lm`: run the Moshi LM service (batched Step)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from moshi_grpc.services.common import flags, logs

log = logging.getLogger(__name__)


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
    )


async def _main(args: argparse.Namespace) -> int:
    from moshi_grpc.services.lm.service import start_lm_server

    config = flags.server_config_from_args(args)
    running = await start_lm_server(config, options_from_args(args), wait_ready=False)
    running.install_signal_handlers()
    log.info("lm listening on %s", running.address)
    try:
        await running.ready
    except Exception as exc:  # noqa: BLE001 - reported, exit code 1
        log.error("lm: could not load the model: %s", exc)
        return 1
    await running.wait_closed()
    return 0


def run(args: argparse.Namespace) -> int:
    logs.install(json_logs=args.json_logs)
    try:
        if args.model == "real":
            flags.resolve_weights(args, "lm")
        if args.max_sessions < 1:
            raise ValueError(f"--max-sessions must be >= 1, got {args.max_sessions}")
        return asyncio.run(_main(args))
    except ValueError as exc:
        log.error("lm: %s", exc)
        return 2
