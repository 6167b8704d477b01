"""`moshi-grpc lm`: run the Moshi LM service (batched Step)."""

from __future__ import annotations

import argparse

from moshi_grpc.services.common.backend import BackendCli
from moshi_grpc.services.common.options import backend_options


def options_from_args(args: argparse.Namespace):
    from moshi_grpc.services.lm.engine import LmOptions

    return LmOptions(
        **backend_options(args),
        weights=args.moshi_weights,
        config=args.lm_config or ("moshiko-7b" if args.moshi_weights else "small"),
        tokenizer=args.tokenizer,
        prefix_cache_mib=args.prefix_cache_mib,
    )


CLI = BackendCli("lm", options_from_args, "moshi_grpc.services.lm.startup:start_lm_server")
add_arguments, run = CLI.add_arguments, CLI.run
