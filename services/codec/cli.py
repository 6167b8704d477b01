"""`moshi-grpc codec`: run the Mimi codec service (batched Encode/Decode)."""

from __future__ import annotations

import argparse

from moshi_grpc.services.common.backend import BackendCli
from moshi_grpc.services.common.options import backend_options


def options_from_args(args: argparse.Namespace):
    from moshi_grpc.services.codec.engine import CodecOptions

    return CodecOptions(
        **backend_options(args),
        weights=args.mimi_weights,
        config=args.mimi_config or "mimi",
        num_codebooks=args.num_codebooks,
    )


CLI = BackendCli("codec", options_from_args, "moshi_grpc.services.codec.startup:start_codec_server")
add_arguments, run = CLI.add_arguments, CLI.run
