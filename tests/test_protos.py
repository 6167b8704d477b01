"""The committed stubs must be exactly what grpcio-tools generates from protos/."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
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


# --------------------------------------------------------------------------- contract guard


def _contract():
    """tools/proto_contract.py (the snapshot's refresh script and the breaking-change rules)."""
    spec = importlib.util.spec_from_file_location(
        "proto_contract", REPO_ROOT / "tools" / "proto_contract.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("proto_contract", module)
    spec.loader.exec_module(module)
    return module


def test_v1_has_no_breaking_change_against_the_snapshot() -> None:
    """protos/ vs the committed descriptor set of v1: additions pass, breaks fail. A failure
    here means a change would break generated clients: revert it, or reserve the number of a
    deleted field; refresh the snapshot after additions with
    `python tools/proto_contract.py --update`."""
    pc = _contract()
    breaks = pc.breaking_changes(pc.load_snapshot(), pc.compile_protos())
    assert not breaks, "breaking changes to v1:\n" + "\n".join(breaks)


def _mutated(fds, mutate):
    from google.protobuf import descriptor_pb2

    copy = descriptor_pb2.FileDescriptorSet()
    copy.CopyFrom(fds)
    files = {f.name.rsplit("/", 1)[-1]: f for f in copy.file}
    mutate(files)
    return copy


def _msg(files, file, name):
    return next(m for m in files[file].message_type if m.name == name)


def _field(files, file, msg, name):
    return next(f for f in _msg(files, file, msg).field if f.name == name)


def _enum(files, file, name):
    return next(e for e in files[file].enum_type if e.name == name)


def _method(files, file, service, name):
    svc = next(s for s in files[file].service if s.name == service)
    return next(m for m in svc.method if m.name == name)


def _remove(container, predicate) -> None:
    for i, item in enumerate(container):
        if predicate(item):
            del container[i]
            return
    raise AssertionError("nothing to remove")


def _set(obj, **values):
    for k, v in values.items():
        setattr(obj, k, v)


_BREAKS = {
    "field removed": (
        lambda fs: _remove(
            _msg(fs, "gateway.proto", "SessionConfig").field, lambda f: f.number == 7
        ),
        "field .moshi_grpc.v1.SessionConfig.client_id (7) removed",
    ),
    "field renumbered": (
        lambda fs: _set(_field(fs, "gateway.proto", "SessionConfig", "client_id"), number=99),
        "field .moshi_grpc.v1.SessionConfig.client_id (7) renumbered to 99",
    ),
    "field renamed": (
        lambda fs: _set(
            _field(fs, "gateway.proto", "AudioChunk", "data"), name="pcm", json_name="pcm"
        ),
        "field .moshi_grpc.v1.AudioChunk.data (1) renamed to pcm",
    ),
    "scalar retyped": (
        lambda fs: _set(
            _field(fs, "gateway.proto", "SessionConfig", "sample_rate"), type=4
        ),  # uint64
        "field .moshi_grpc.v1.SessionConfig.sample_rate (1) type changed from int32 to uint64",
    ),
    "message retyped": (
        lambda fs: _set(
            _field(fs, "gateway.proto", "ConverseRequest", "audio"),
            type_name=".moshi_grpc.v1.AudioOut",
        ),
        "type changed from .moshi_grpc.v1.AudioChunk to .moshi_grpc.v1.AudioOut",
    ),
    "label changed": (
        lambda fs: _set(_field(fs, "gateway.proto", "AudioChunk", "data"), label=3),  # repeated
        "field .moshi_grpc.v1.AudioChunk.data (1) label changed from singular to repeated",
    ),
    "moved out of a oneof": (
        lambda fs: _field(fs, "gateway.proto", "ConverseRequest", "audio").ClearField(
            "oneof_index"
        ),
        "field .moshi_grpc.v1.ConverseRequest.audio (2) oneof changed from kind to None",
    ),
    "message removed": (
        lambda fs: _remove(fs["gateway.proto"].message_type, lambda m: m.name == "Failover"),
        "message .moshi_grpc.v1.Failover removed",
    ),
    "enum value removed": (
        lambda fs: _remove(
            _enum(fs, "gateway.proto", "AudioEncoding").value, lambda v: v.number == 2
        ),
        "enum value .moshi_grpc.v1.AudioEncoding.AUDIO_ENCODING_FLOAT32 (2) removed",
    ),
    "enum value renumbered": (
        lambda fs: _set(
            next(v for v in _enum(fs, "gateway.proto", "AudioEncoding").value if v.number == 1),
            number=42,
        ),
        "enum value .moshi_grpc.v1.AudioEncoding.AUDIO_ENCODING_PCM16 (1) renumbered to 42",
    ),
    "enum value moved to a new number, its old one reused": (
        lambda fs: [
            _set(v, number=42 if v.number == 1 else 1 if v.number == 2 else v.number)
            for v in _enum(fs, "gateway.proto", "AudioEncoding").value
        ],
        "enum value .moshi_grpc.v1.AudioEncoding.AUDIO_ENCODING_PCM16 (1) renumbered to 42",
    ),
    "enum removed": (
        lambda fs: _remove(fs["gateway.proto"].enum_type, lambda e: e.name == "AudioEncoding"),
        "enum .moshi_grpc.v1.AudioEncoding removed",
    ),
    "method input changed": (
        lambda fs: _set(
            _method(fs, "gateway.proto", "Gateway", "Converse"),
            input_type=".moshi_grpc.v1.AudioChunk",
        ),
        "method .moshi_grpc.v1.Gateway.Converse input type changed",
    ),
    "method output changed": (
        lambda fs: _set(
            _method(fs, "gateway.proto", "Gateway", "Converse"),
            output_type=".moshi_grpc.v1.AudioOut",
        ),
        "method .moshi_grpc.v1.Gateway.Converse output type changed",
    ),
    "method streaming changed": (
        lambda fs: _set(
            _method(fs, "gateway.proto", "Gateway", "Converse"), client_streaming=False
        ),
        "method .moshi_grpc.v1.Gateway.Converse client streaming changed to False",
    ),
    "method removed": (
        lambda fs: _remove(fs["codec.proto"].service[0].method, lambda m: m.name == "Encode"),
        "method .moshi_grpc.v1.Codec.Encode removed",
    ),
    "service removed": (
        lambda fs: fs["lm.proto"].ClearField("service"),
        "service .moshi_grpc.v1.LM removed",
    ),
    "package changed": (
        lambda fs: _set(fs["lm.proto"], package="moshi_grpc.v2"),
        "file moshi_grpc/v1/lm.proto: package changed",
    ),
}


@pytest.mark.parametrize("kind", list(_BREAKS))
def test_each_kind_of_break_is_caught(kind: str) -> None:
    pc = _contract()
    base = pc.load_snapshot()
    mutate, expected = _BREAKS[kind]
    breaks = pc.breaking_changes(base, _mutated(base, mutate))
    assert any(expected in b for b in breaks), breaks


def test_additions_and_reserved_deletions_are_allowed() -> None:
    from google.protobuf import descriptor_pb2

    pc = _contract()
    base = pc.load_snapshot()

    def grow(fs) -> None:
        cfg = _msg(fs, "gateway.proto", "SessionConfig")
        cfg.field.add(name="new_knob", number=500, type=9, label=1, json_name="newKnob")
        _enum(fs, "gateway.proto", "AudioEncoding").value.add(name="AUDIO_ENCODING_FLAC", number=77)
        fs["gateway.proto"].message_type.add(name="BrandNew")
        svc = fs["gateway.proto"].service[0]
        svc.method.add(
            name="Ping", input_type=".moshi_grpc.v1.BrandNew", output_type=".moshi_grpc.v1.BrandNew"
        )
        fs["gateway.proto"].service.add(name="Admin")
        # A field deleted with its number reserved is not a break (buf's rule too).
        chunk = _msg(fs, "gateway.proto", "AudioOut")
        _remove(chunk.field, lambda f: f.name == "silence")
        chunk.reserved_range.add(start=3, end=4)
        chunk.reserved_name.append("silence")

    assert pc.breaking_changes(base, _mutated(base, grow)) == []
    assert pc.breaking_changes(base, base) == []
    assert isinstance(base, descriptor_pb2.FileDescriptorSet) and len(base.file) == 4


def test_contract_tool_refuses_to_bless_a_break(tmp_path, monkeypatch) -> None:
    """`--update` on a breaking change writes nothing and exits 1 (a break needs a v2)."""
    pc = _contract()
    snapshot = tmp_path / "v1.descriptor.binpb"
    base = pc.load_snapshot()
    broken = _mutated(base, _BREAKS["field removed"][0])
    snapshot.write_bytes(base.SerializeToString())
    monkeypatch.setattr(pc, "SNAPSHOT", snapshot)
    monkeypatch.setattr(pc, "ROOT", tmp_path)
    monkeypatch.setattr(pc, "compile_protos", lambda: broken)
    assert pc.main(["--update"]) == 1 and pc.main([]) == 1
    assert snapshot.read_bytes() == base.SerializeToString()
