"""The committed stubs must be exactly what grpcio-tools generates from protos/."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
    )
    generated = sorted((tmp_path / "moshi_grpc" / "v1").glob("*_pb2*"))
    committed = sorted(p for p in (REPO_ROOT / "moshi_grpc" / "v1").glob("*_pb2*"))
    assert [p.name for p in generated] == [p.name for p in committed], "stub file set differs"
    stale = [p.name for p, q in zip(generated, committed) if p.read_bytes() != q.read_bytes()]
    assert not stale, f"stale stubs {stale}: run `python tools/gen_protos.py` and commit"


def test_every_proto_has_stubs() -> None:
    protos = sorted(p.stem for p in (REPO_ROOT / "protos" / "moshi_grpc" / "v1").glob("*.proto"))
    assert protos == ["codec", "common", "gateway", "lm"]
    for name in protos:
        assert importlib.util.find_spec(f"moshi_grpc.v1.{name}_pb2") is not None


def test_contract_is_versioned_and_not_named_moshi() -> None:
    from moshi_grpc.v1 import codec_pb2, gateway_pb2, lm_pb2

    for mod in (codec_pb2, gateway_pb2, lm_pb2):
        assert mod.DESCRIPTOR.package == "moshi_grpc.v1"
    services = {
        s.full_name
        for mod in (codec_pb2, gateway_pb2, lm_pb2)
        for s in mod.DESCRIPTOR.services_by_name.values()
    }
    assert services == {"moshi_grpc.v1.Codec", "moshi_grpc.v1.LM", "moshi_grpc.v1.Gateway"}


def test_every_field_is_documented() -> None:
    """Each message field and rpc in the .proto files carries a comment (the contract is the doc)."""
    import re

    undocumented = []
    for path in (REPO_ROOT / "protos" / "moshi_grpc" / "v1").glob("*.proto"):
        lines = path.read_text().splitlines()
        in_oneof = False  # oneof members are documented by the oneof's message comment
        for i, line in enumerate(lines):
            s = line.strip()
            if s.startswith("oneof "):
                in_oneof = True
            elif s == "}":
                in_oneof = False
            is_field = re.match(r"^(optional |repeated )?[\w.]+ \w+ = \d+;", s)
            is_decl = re.match(r"^(rpc|message|service) ", s)
            if in_oneof or not (is_field or is_decl) or "AUDIO_ENCODING" in s:
                continue
            if not (i and lines[i - 1].strip().startswith("//")):
                undocumented.append(f"{path.name}:{i + 1}: {s}")
    assert not undocumented, "undocumented fields/rpcs:\n" + "\n".join(undocumented)
