"""Regenerate the committed gRPC stubs from protos/ (the contract).

    python tools/gen_protos.py            # writes moshi_grpc/v1/*_pb2*.py(i)
    python tools/gen_protos.py --out DIR  # writes elsewhere (the staleness test uses this)

Stubs are committed so users need no protoc; tests/test_protos.py fails when they drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "moshi_grpc" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run grpcio-tools' protoc over every .proto into `out_dir` (mirrors the package path)."""
    from importlib import resources

    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
