"""Flags every benchmark spells the same way.

- `--batch 1,4,8`: the batch sizes to time (`--batches` still works, hidden and deprecated).
- `--reference [PYTHON]`: also time the reference `moshi` package, with this python (default
  env MOSHI_REFERENCE_PYTHON or .venv-reference/bin/python). `--reference-python PYTHON`
  still works, hidden and deprecated: it names the python, `--reference` turns the run on.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_REFERENCE = os.environ.get("MOSHI_REFERENCE_PYTHON", ".venv-reference/bin/python")


def _warn(old: str, new: str) -> None:
    print(f"moshi-grpc bench: {old} is deprecated, use {new}", file=sys.stderr)


class _DeprecatedBatches(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _warn(option_string, "--batch")
        setattr(namespace, self.dest, values)


class _Reference(argparse.Action):
    """`--reference [PYTHON]`: the python given, else one named by `--reference-python`."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        chosen = values or getattr(namespace, "_reference_python", None) or DEFAULT_REFERENCE
        setattr(namespace, self.dest, chosen)


class _DeprecatedReferencePython(argparse.Action):
    """Old `--reference-python PYTHON`: names the python; `--reference` still turns it on."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _warn(option_string, "--reference PYTHON")
        namespace._reference_python = values
        if getattr(namespace, "reference", None) is not None:
            namespace.reference = values


def add_batch(parser: argparse.ArgumentParser, default: str = "1,4,8") -> None:
    """`--batch` (dest `batch`): comma-separated batch sizes."""
    parser.add_argument("--batch", default=default, help="comma-separated batch sizes")
    parser.add_argument(
        "--batches", dest="batch", action=_DeprecatedBatches, help=argparse.SUPPRESS
    )


def add_reference(
    parser: argparse.ArgumentParser, what: str = "the reference moshi package"
) -> None:
    """`--reference [PYTHON]` (dest `reference`: None, or the python to run it with)."""
    parser.add_argument(
        "--reference",
        nargs="?",
        default=None,
        action=_Reference,
        metavar="PYTHON",
        help=f"also time {what} with this python (default {DEFAULT_REFERENCE}; "
        "../shared/tools/reference-venv makes one)",
    )
    parser.add_argument(
        "--reference-python",
        action=_DeprecatedReferencePython,
        metavar="PYTHON",
        help=argparse.SUPPRESS,
    )
