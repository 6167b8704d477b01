"""The v1 contract guard: a committed descriptor set of protos/moshi_grpc/v1 and a
breaking-change check against it.

    python tools/proto_contract.py            # check protos/ against the snapshot (exit 1 on a break)
    python tools/proto_contract.py --update   # refresh the snapshot after additive changes

The snapshot is `protos/moshi_grpc/v1.descriptor.binpb`, a `FileDescriptorSet` (what
`buf build -o` writes) compiled without source info, so comments do not churn it. Additions
are allowed (new files, messages, fields, enum values, services, methods); what generated
clients in any language would break on is not. The rules follow buf's WIRE_JSON breaking
rules where they concern these files:

- a file, message, enum or service removed; a file's package changed;
- a field removed (unless its number is now reserved), renumbered (same name, new number),
  renamed (same number, new name: JSON and generated code), retyped (scalar type or message/
  enum type), its label changed (singular/optional/repeated), or moved in or out of a oneof;
- an enum value removed (unless its number is now reserved), renumbered or renamed;
- a method removed, its input or output type changed, or its streaming changed.

tests/test_protos.py runs the check and shows each kind of break is caught.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
SNAPSHOT = PROTO_ROOT / "moshi_grpc" / "v1.descriptor.binpb"

FDP = descriptor_pb2.FieldDescriptorProto
_LABELS = {
    FDP.LABEL_OPTIONAL: "singular",
    FDP.LABEL_REPEATED: "repeated",
    FDP.LABEL_REQUIRED: "required",
}


def compile_protos(proto_root: Path = PROTO_ROOT) -> descriptor_pb2.FileDescriptorSet:
    """protoc (grpcio-tools) over every .proto of v1 -> a FileDescriptorSet, no source info."""
    from importlib import resources

    from grpc_tools import protoc

    files = sorted((proto_root / "moshi_grpc" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "v1.binpb"
        code = protoc.main(
            [
                "protoc",
                f"-I{proto_root}",
                f"-I{resources.files('grpc_tools') / '_proto'}",
                f"--descriptor_set_out={out}",
                *[str(p.relative_to(proto_root)) for p in files],
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def load_snapshot(path: Path = SNAPSHOT) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


# --------------------------------------------------------------------------- indexing


def _messages(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message by full name, nested ones included."""
    out: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, msgs) -> None:
        for m in msgs:
            name = f"{prefix}.{m.name}"
            out[name] = m
            walk(name, m.nested_type)

    for f in fds.file:
        walk(f".{f.package}" if f.package else "", f.message_type)
    return out


def _enums(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.EnumDescriptorProto]:
    out: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
    for f in fds.file:
        prefix = f".{f.package}" if f.package else ""
        for e in f.enum_type:
            out[f"{prefix}.{e.name}"] = e
    for name, m in _messages(fds).items():
        for e in m.enum_type:
            out[f"{name}.{e.name}"] = e
    return out


def _services(
    fds: descriptor_pb2.FileDescriptorSet,
) -> dict[str, descriptor_pb2.ServiceDescriptorProto]:
    out = {}
    for f in fds.file:
        prefix = f".{f.package}" if f.package else ""
        for s in f.service:
            out[f"{prefix}.{s.name}"] = s
    return out


def _reserved(ranges, number: int, inclusive: bool) -> bool:
    """Whether `number` lies in reserved ranges (`inclusive`: the end too, as enums have it)."""
    return any(r.start <= number < r.end + inclusive for r in ranges)


def _survivors(kind: str, old: dict, new: dict, breaks: list[str]):
    """(name, old, new) for each named message/enum/service still there; the others are
    appended to `breaks` as removed."""
    for name, x in old.items():
        if name in new:
            yield name, x, new[name]
        else:
            breaks.append(f"{kind} {name} removed")


def _kept_members(kind: str, owner: str, old, new, reserved_ranges, breaks: list[str]):
    """Pair each old numbered member (field or enum value) with the new one at its number,
    appending to `breaks` the members renumbered, or removed without reserving the number.
    Message reserved ranges end exclusive, enum ones inclusive."""
    inclusive = kind == "enum value"
    by_number = {x.number: x for x in new}
    by_name = {x.name: x for x in new}
    kept = []
    for x in old:
        where = f"{kind} {owner}.{x.name} ({x.number})"
        if x.name in by_name and by_name[x.name].number != x.number:
            breaks.append(f"{where} renumbered to {by_name[x.name].number}")
        y = by_number.get(x.number)
        if y is not None:
            kept.append((where, x, y))
        elif x.name not in by_name and not _reserved(reserved_ranges, x.number, inclusive):
            breaks.append(f"{where} removed (reserve its number to delete it)")
    return kept


def _field_type(f: descriptor_pb2.FieldDescriptorProto) -> str:
    if f.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM, FDP.TYPE_GROUP):
        return f.type_name
    return FDP.Type.Name(f.type)[len("TYPE_") :].lower()


def _label(f: descriptor_pb2.FieldDescriptorProto) -> str:
    if f.proto3_optional:
        return "optional"
    return _LABELS[f.label]


def _oneof(m: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto) -> str | None:
    # proto3 `optional` fields sit in a synthetic oneof: that is presence, not a real oneof.
    if not f.HasField("oneof_index") or f.proto3_optional:
        return None
    return m.oneof_decl[f.oneof_index].name


# --------------------------------------------------------------------------- the rules


def breaking_changes(
    old: descriptor_pb2.FileDescriptorSet, new: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    """Every change from `old` to `new` that breaks wire, JSON or generated-code users."""
    breaks: list[str] = []
    new_files = {f.name: f for f in new.file}
    for f in old.file:
        if f.name not in new_files:
            breaks.append(f"file {f.name} removed")
        elif new_files[f.name].package != f.package:
            breaks.append(
                f"file {f.name}: package changed from {f.package!r} to "
                f"{new_files[f.name].package!r}"
            )

    for name, m, n in _survivors("message", _messages(old), _messages(new), breaks):
        for where, f, g in _kept_members("field", name, m.field, n.field, n.reserved_range, breaks):
            if g.name != f.name:
                breaks.append(f"{where} renamed to {g.name}")
            if _field_type(g) != _field_type(f):
                breaks.append(f"{where} type changed from {_field_type(f)} to {_field_type(g)}")
            if _label(g) != _label(f):
                breaks.append(f"{where} label changed from {_label(f)} to {_label(g)}")
            if _oneof(n, g) != _oneof(m, f):
                breaks.append(f"{where} oneof changed from {_oneof(m, f)} to {_oneof(n, g)}")

    for name, e, n in _survivors("enum", _enums(old), _enums(new), breaks):
        names = {v.name for v in n.value}
        for where, v, w in _kept_members(
            "enum value", name, e.value, n.value, n.reserved_range, breaks
        ):
            if w.name != v.name and v.name not in names:  # (a new alias keeps the old name)
                breaks.append(f"{where} renamed to {w.name}")

    for name, s, n in _survivors("service", _services(old), _services(new), breaks):
        methods = {m.name: m for m in n.method}
        for m in s.method:
            where = f"method {name}.{m.name}"
            k = methods.get(m.name)
            if k is None:
                breaks.append(f"{where} removed")
                continue
            if k.input_type != m.input_type:
                breaks.append(f"{where} input type changed from {m.input_type} to {k.input_type}")
            if k.output_type != m.output_type:
                breaks.append(
                    f"{where} output type changed from {m.output_type} to {k.output_type}"
                )
            if k.client_streaming != m.client_streaming:
                breaks.append(f"{where} client streaming changed to {k.client_streaming}")
            if k.server_streaming != m.server_streaming:
                breaks.append(f"{where} server streaming changed to {k.server_streaming}")
    return breaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--update", action="store_true", help="write the snapshot from protos/ (after a review)"
    )
    args = parser.parse_args(argv)
    current = compile_protos()
    if not args.update:
        breaks = breaking_changes(load_snapshot(), current)
        for b in breaks:
            print(f"breaking: {b}", file=sys.stderr)
        if breaks:
            return 1
        print(f"protos/ is compatible with {SNAPSHOT.relative_to(ROOT)}")
        return 0
    # Refuse to bless a break by accident: a break needs a new package (v2), not a refresh.
    if SNAPSHOT.exists():
        breaks = breaking_changes(load_snapshot(), current)
        if breaks:
            for b in breaks:
                print(f"breaking: {b}", file=sys.stderr)
            print(
                "not updating: these changes break v1 (make a v2 package instead)", file=sys.stderr
            )
            return 1
    SNAPSHOT.write_bytes(current.SerializeToString(deterministic=True))
    print(f"wrote {SNAPSHOT.relative_to(ROOT)} ({len(current.file)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
