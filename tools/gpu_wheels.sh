#!/usr/bin/env bash
# Wheels for the GPU check (tools/gpu_check.sh) on a machine with no package registry: every
# wheel the server and the gpu tests need beyond what the GPU image has, for CPython 3.12 on
# manylinux x86_64, plus the project's own wheel, into .whl/ (git-ignored; carried with the
# working tree, 64 MiB for both). Run here, from any directory:
#
#   tools/gpu_wheels.sh            # PYTHON (default .venv/bin/python) runs pip
#
# What the image has (Python 3.12, torch 2.11 + CUDA 13, grpcio, protobuf, numpy,
# safetensors, sentencepiece, prometheus-client, pytest, hypothesis) is not downloaded,
# except grpcio, protobuf and pytest: pyproject's floors for them (grpcio >= 1.85.1,
# protobuf >= 7.35.1, the pytest that pytest-asyncio needs) may be newer than the image's,
# so their wheels travel too and pip installs them only where the image's are older.
# The set is resolved as one install (pip --dry-run --report, for the target platform, so
# nothing big is fetched), then each wheel is downloaded without dependencies;
# .whl/requirements.txt lists what tools/gpu_check.sh installs from them.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
DEST=${WHEEL_DIR:-.whl}
LIMIT_MIB=${WHEEL_LIMIT_MIB:-48}  # of the 64 MiB a device call carries: the tree needs room
target=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in 17 24 26 27 28 31 34 35 36 38 39; do target+=(--platform "manylinux_2_${n}_x86_64"); done
target+=(--platform manylinux2014_x86_64)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# What to resolve: the base install and the server extra from pyproject.toml, the test
# plugins the gpu tests run under, minus what the image has.
$PY - >"$tmp/requirements.txt" <<'EOF'
import re
import tomllib

IMAGE = {"torch", "numpy", "safetensors", "sentencepiece", "prometheus-client", "hypothesis"}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + project["optional-dependencies"]["server"]
wanted += [r for r in project["optional-dependencies"]["test"] if r.startswith("pytest")]
for req in wanted:
    name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")
    if name not in IMAGE and name != "pytest-timeout":  # the image has pytest-timeout too
        print(req)
EOF
echo "gpu_wheels: resolving for CPython 3.12 manylinux x86_64:" $(cat "$tmp/requirements.txt")
$PY -m pip install -q --dry-run --ignore-installed --disable-pip-version-check "${target[@]}" \
  --target "$tmp/none" --report "$tmp/report.json" -r "$tmp/requirements.txt" 2> >(grep -v 'is ignored' >&2)

# The resolved set minus the image's packages (and what only they need), as name==version.
$PY - "$tmp/report.json" >"$tmp/pins.txt" <<'EOF'
import json
import sys

IMAGE = {
    "torch", "numpy", "safetensors", "sentencepiece", "prometheus-client", "hypothesis",
    "typing-extensions", "attrs", "sortedcontainers", "filelock", "fsspec", "jinja2",
    "markupsafe", "networkx", "sympy", "mpmath", "setuptools", "pytest-timeout",
}
for item in json.load(open(sys.argv[1]))["install"]:
    name = item["metadata"]["name"].lower().replace("_", "-")
    if name not in IMAGE:
        print(f"{name}=={item['metadata']['version']}")
EOF

rm -rf "$DEST"
mkdir -p "$DEST"
$PY -m pip download -q --no-deps --disable-pip-version-check "${target[@]}" -d "$DEST" \
  -r "$tmp/pins.txt" 2> >(grep -v 'is ignored' >&2)
$PY -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check -w "$DEST" . \
  >/dev/null
rm -rf build  # setuptools' staging folder
# What gpu_check.sh installs, each with --no-deps (pip must not walk into torch's own CUDA
# dependencies, which the image installed its way): the set resolved together here, each at
# least at the version resolved (an image's newer one stays), and the project itself.
{
  sed 's/==/>=/' "$tmp/pins.txt"
  ls "$DEST" | sed -n 's/^moshi_grpc-\([^-]*\)-.*\.whl$/moshi-grpc==\1/p'
} >"$DEST/requirements.txt"

echo "gpu_wheels: $DEST/"
total=0
for f in "$DEST"/*.whl; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  printf '  %-80s %6.2f MiB\n' "$(basename "$f")" "$(echo "$size / 1048576" | bc -l)"
done
printf '  total %d wheels, %.2f MiB (limit %d MiB)\n' "$(ls "$DEST"/*.whl | wc -l)" \
  "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_wheels: over ${LIMIT_MIB} MiB: the device call carries 64 MiB with the tree" >&2
  exit 1
fi
