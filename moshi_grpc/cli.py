"""The one console script, `moshi-grpc`, with a subcommand per deployable or job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`,
so the services, the client and the benchmarks own their flags. Modules are imported only
for the subcommand that runs (torch is slow to import; `--help` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from moshi_grpc import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "codec": (
        "moshi_grpc.services.codec.cli",
        "run the Mimi codec service (batched Encode/Decode)",
    ),
    "lm": ("moshi_grpc.services.lm.cli", "run the Moshi LM service (batched Step)"),
    "gateway": ("moshi_grpc.services.gateway.cli", "run the session gateway (public Converse API)"),
    "up": ("moshi_grpc.services.up", "run codec, LM and gateway on loopback (the main job)"),
    "converse": (
        "moshi_grpc.clients.cli",
        "stream a wav file through a gateway; write reply + transcript",
    ),
    "bench": ("moshi_grpc.bench.cli", "benchmarks: codec, lm, services, gateway"),
}

# Subcommands that run the Mimi or LM model need the `server` extra; the base install (SDK,
# `converse`, `gateway`) has no torch.
NEEDS_SERVER = frozenset({"codec", "lm", "up", "bench"})
SERVER_MODULES = ("torch", "sentencepiece", "safetensors")


def _missing_server_modules() -> list[str]:
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def _server_hint(command: str, missing: Sequence[str]) -> str:
    return (
        f"moshi-grpc {command}: needs the [server] extra (missing: {', '.join(missing)}); "
        "install it with: pip install 'moshi-grpc[server]'"
    )


def _load(module_name: str):
    """Import a subcommand module; None when it does not exist yet or lacks the entry points."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        return None
    return module


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-grpc",
        description="Production gRPC serving for Moshi (Mimi codec + Moshi LM).",
    )
    parser.add_argument("--version", action="version", version=f"moshi-grpc {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported, so `moshi-grpc codec --help` does not
    # pay for the LM's imports and vice versa.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _load(module_name)
            if module is not None:
                module.add_arguments(p)
                p.set_defaults(_run=module.run)
            else:
                p.set_defaults(_run=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    except ModuleNotFoundError as exc:  # e.g. `bench --help`: its modules import torch
        if chosen in NEEDS_SERVER and (exc.name or "").split(".")[0] in SERVER_MODULES:
            print(_server_hint(chosen, _missing_server_modules() or [exc.name]), file=sys.stderr)
            return 2
        raise
    if args.command in NEEDS_SERVER:
        missing = _missing_server_modules()
        if missing:
            print(_server_hint(args.command, missing), file=sys.stderr)
            return 2
    if getattr(args, "otel_endpoint", None):
        from moshi_grpc.services.common.tracing import otel_hint

        hint = otel_hint(args.command)
        if hint is not None:
            print(hint, file=sys.stderr)
            return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    run = getattr(args, "_run", None)
    if run is None:
        print(f"moshi-grpc {args.command}: not implemented yet in this version.", file=sys.stderr)
        return 2
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
