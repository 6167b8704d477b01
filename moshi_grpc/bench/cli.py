"""`moshi-grpc bench <target>`: dispatch to one benchmark module per target.

Each benchmark module exposes `add_arguments(parser)` and `run(args) -> int` and prints its
figures (medians, ratios against the reference where one exists).
"""

from __future__ import annotations

import argparse
import importlib

TARGETS = {
    "codec": ("moshi_grpc.bench.codec", "Mimi encode/decode ms per 80 ms frame (streaming)"),
    "lm": ("moshi_grpc.bench.lm", "Moshi LM ms per step at several batch sizes"),
    "services": ("moshi_grpc.bench.services", "codec and LM services: frames/s, latency, overhead"),
    "gateway": ("moshi_grpc.bench.gateway", "gateway-added latency at many concurrent sessions"),
    "gpu": (
        "moshi_grpc.bench.gpu",
        "sessions per GPU: LM + codec tick per bucket, eager vs CUDA graphs",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, (module_name, help_text) in TARGETS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            p.set_defaults(_bench=None)
            continue
        module.add_arguments(p)
        p.set_defaults(_bench=module.run)


def run(args: argparse.Namespace) -> int:
    if args._bench is None:
        print(f"bench {args.target}: not implemented yet in this version.")
        return 2
    return int(args._bench(args) or 0)
