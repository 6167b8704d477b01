"""Project hygiene: packaging lists every package, lint is clean, layers point down, CLI works."""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from conftest import REPO_ROOT


def _packages_on_disk() -> set[str]:
    """Every package under moshi_grpc/, following its symlinks to services/ and clients/."""
    found = set()
    base = REPO_ROOT / "moshi_grpc"
    for dirpath, _dirs, files in os.walk(base, followlinks=True):
        if "__init__.py" in files:
            rel = Path(dirpath).relative_to(base)
            found.add(".".join(["moshi_grpc", *rel.parts]))
    return found


def test_packages_are_discovered_and_cover_every_folder() -> None:
    """No hand-kept package table: setuptools finds `moshi_grpc*`, and the deployables and
    the SDK are inside that tree through symlinks, so nothing can be forgotten."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    setuptools_cfg = config["tool"]["setuptools"]
    assert "package-dir" not in setuptools_cfg
    assert setuptools_cfg["packages"]["find"]["include"] == ["moshi_grpc*"]
    for name in ("services", "clients"):
        link = REPO_ROOT / "moshi_grpc" / name
        assert link.is_symlink() and link.resolve() == (REPO_ROOT / name).resolve(), link
    packages = _packages_on_disk()
    assert {"moshi_grpc.services.gateway", "moshi_grpc.clients", "moshi_grpc.models"} <= packages


def test_every_module_imports_from_its_file_path_in_a_bare_checkout() -> None:
    """A reader of the checkout (editor, type checker, structure tool) derives a module's
    import path from its file path: `services/gateway/session.py` is
    `moshi_grpc.services.gateway.session`. Checked with the repo root alone on sys.path (no
    install): every module's spec points at that very file."""
    pairs = []
    for folder in ("moshi_grpc", "services", "clients"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[0] != "moshi_grpc":
                parts.insert(0, "moshi_grpc")
            if parts[-1] == "__init__":
                parts.pop()
            pairs.append((".".join(parts), str(path.resolve())))
    probe = (
        "import importlib.util, json, os, sys\n"
        "sys.path[:] = [p for p in sys.path if 'site-packages' in p or 'lib/python' in p]\n"
        "sys.path.insert(0, os.getcwd())\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        "bad = []\n"
        "for name, want in json.loads(sys.stdin.read()):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    got = os.path.realpath(spec.origin) if spec and spec.origin else None\n"
        "    if got != want: bad.append((name, got, want))\n"
        "print(json.dumps(bad))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        input=json.dumps(pairs),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [], out.stdout
    assert len(pairs) > 50


def test_no_package_named_moshi() -> None:
    """`moshi` is the public reference package; we must never shadow it."""
    assert not any(p == "moshi" or p.startswith("moshi.") for p in _packages_on_disk())
    assert not (REPO_ROOT / "moshi").exists()


def test_model_code_never_imports_grpc() -> None:
    """Layers point down: models are torch-only and can be used without any serving code."""
    offenders = []
    for path in (REPO_ROOT / "moshi_grpc" / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in {
                    "grpc",
                    "grpc_health",
                    "grpc_reflection",
                    "prometheus_client",
                } or n.startswith(("moshi_grpc.services", "moshi_grpc.clients", "moshi_grpc.v1")):
                    offenders.append(f"{path.relative_to(REPO_ROOT)} imports {n}")
    assert not offenders, offenders


# Engines and what they stand on: transport-agnostic, so the serving layer alone knows gRPC.
ENGINE_MODULES = (
    "moshi_grpc.services.codec.engine",
    "moshi_grpc.services.lm.engine",
    "moshi_grpc.services.common.batching",
    "moshi_grpc.services.common.buckets",
    "moshi_grpc.services.common.cuda_graphs",
    "moshi_grpc.services.common.errors",
)


def test_engines_never_import_grpc() -> None:
    """Layers point down: importing an engine (transitively) loads neither grpc nor the
    v1 protos. Checked in a fresh interpreter, where sys.modules shows everything pulled in."""
    engines = sorted(
        str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "services").glob("*/engine.py")
    )
    assert len(engines) >= 2 and all(
        ("moshi_grpc." + e[: -len(".py")].replace("/", ".")) in ENGINE_MODULES for e in engines
    ), f"add every services/*/engine.py to ENGINE_MODULES: {engines}"
    script = (
        "import importlib, sys\n"
        "importlib.import_module(sys.argv[1])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "    ('grpc', 'grpc_health', 'grpc_reflection', 'grpc_status')\n"
        "    or m.startswith('moshi_grpc.v1')))\n"
    )
    # One interpreter per module: an earlier import must not hide a later one's.
    for name in ENGINE_MODULES:
        out = subprocess.run(
            [sys.executable, "-c", script, name],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == "[]", f"{name} imports {out.stdout.strip()}"


def test_ruff_lint_and_format_clean() -> None:
    # The [test] extra installs ruff beside the interpreter running the tests, whatever the
    # venv is called and whether or not it is on PATH.
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed (it is in the [test] extra)")
    lint = subprocess.run([ruff, "check", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [ruff, "format", "--check", "."], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, "run `ruff format .`:\n" + fmt.stdout + fmt.stderr


def test_cli_help_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "moshi_grpc.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("codec", "lm", "gateway", "up", "converse", "bench"):
        assert name in out
    for name in ("codec", "lm", "gateway", "up", "converse", "bench"):
        sub = subprocess.run(
            [sys.executable, "-m", "moshi_grpc.cli", name, "--help"], capture_output=True, text=True
        )
        assert sub.returncode == 0, sub.stderr
        assert "usage: moshi-grpc " + name in sub.stdout


# --------------------------------------------------------------------------- base install

# Modules only the codec/LM services need: the base install must not bring them.
SERVER_ONLY = ("torch", "sentencepiece", "safetensors")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _base_closure() -> list[importlib.metadata.Distribution]:
    """The installed distributions the base install needs: pyproject's dependencies (no
    extras), their dependencies, and the build backend. Skips when one is not installed
    here (then no offline wheelhouse can be made)."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    todo = [Requirement(r) for r in project["project"]["dependencies"]]
    todo += [Requirement(r.split("#")[0]) for r in project["build-system"]["requires"]]
    seen: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _canonical(req.name)
        if name in seen:
            continue
        assert name not in SERVER_ONLY, f"the base install pulls in {name} (via pyproject.toml)"
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"cannot make an offline wheelhouse: {req.name} is not installed here")
        seen[name] = dist
        todo += [Requirement(r) for r in dist.requires or ()]
    return list(seen.values())


def _wheel_from_installed(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """Pack an installed distribution back into a wheel (its files as RECORD lists them, its
    original tag), so a fresh venv can install it offline with pip's real resolver."""
    wheel_meta = dist.read_text("WHEEL") or ""
    tag = next(
        (
            line.split(":", 1)[1].strip()
            for line in wheel_meta.splitlines()
            if line.startswith("Tag:")
        ),
        "py3-none-any",
    )
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = out / f"{name}-{dist.version}-{tag}.whl"
    site = Path(str(dist.locate_file("")))
    record_name = None
    rows = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for f in dist.files or ():
            rel = str(f)
            if rel.startswith("..") or "__pycache__" in rel:
                continue  # scripts outside site-packages are regenerated by pip
            top, _, leaf = rel.partition("/")
            if top.endswith(".dist-info") and leaf == "RECORD":  # (not a vendored one)
                record_name = rel
                continue
            if top.endswith(".dist-info") and leaf in ("INSTALLER", "REQUESTED", "direct_url.json"):
                continue  # written by the installer
            data = (site / rel).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            rows.append(f"{rel},sha256={digest.decode()},{len(data)}")
            zf.writestr(rel, data)
        assert record_name, f"{dist.metadata['Name']}: no RECORD"
        zf.writestr(record_name, "\n".join([*rows, f"{record_name},,"]) + "\n")
    return path


@pytest.mark.slow
def test_base_install_has_sdk_converse_gateway_and_no_torch(tmp_path: Path) -> None:
    """A fresh venv with the base install (a real pip install, resolving dependencies, from a
    local wheelhouse made of what is installed here: offline): the SDK and gateway import,
    `converse --help` runs, torch is absent, and the model commands fail with a hint."""
    venv = tmp_path / "venv"
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
    )
    if made.returncode != 0:
        pytest.skip(f"cannot create a venv offline here: {made.stderr.strip()[-300:]}")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist in _base_closure():
        _wheel_from_installed(dist, wheels)
    src = tmp_path / "src"  # a copy: building must not write into the work tree
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("moshi_grpc", "services", "clients"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=ignore, symlinks=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # only our wheelhouse, no machine-wide index
    py = str(venv / "bin" / "python")
    install = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
         "--no-cache-dir", str(src)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr

    probe = (
        "import importlib.util, sys\n"
        "for m in ('torch', 'sentencepiece', 'safetensors'):\n"
        "    assert importlib.util.find_spec(m) is None, m + ' is installed'\n"
        "import numpy as np\n"
        "import moshi_grpc.clients, moshi_grpc.clients.cli, moshi_grpc.v1.gateway_pb2\n"
        "import moshi_grpc.services.gateway.cli\n"
        "from moshi_grpc import audio\n"
        "x = audio.speech_like(0.4, 24000)\n"
        "enc = audio.StreamEncoder(audio.OGG_OPUS, 24000)\n"
        "dec = audio.StreamDecoder(audio.OGG_OPUS, 24000)\n"
        "y = dec.decode(b''.join(enc.encode(x[i:i + 1920]) for i in range(0, 9600, 1920)))\n"
        "assert y.size > 0\n"
        "loaded = sorted(m for m in ('torch', 'sentencepiece', 'safetensors') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "print('ok', moshi_grpc.clients.ConverseClient.__name__)\n"
    )
    # Run outside the work tree, so `moshi_grpc` is the installed package, not ./moshi_grpc.
    here = {"capture_output": True, "text": True, "env": env, "cwd": tmp_path, "timeout": 120}
    run = subprocess.run([py, "-c", probe], **here)
    assert run.returncode == 0 and "ok ConverseClient" in run.stdout, run.stdout + run.stderr
    cli = str(venv / "bin" / "moshi-grpc")
    for name in ("converse", "gateway"):
        out = subprocess.run([cli, name, "--help"], **here)
        assert out.returncode == 0, out.stderr
        assert f"usage: moshi-grpc {name}" in out.stdout
    for argv in (["codec"], ["lm"], ["up"], ["bench", "codec"], ["bench", "gateway"]):
        out = subprocess.run([cli, *argv], **here)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (argv, out.stdout, out.stderr)
        assert "[server]" in lines[0] and "torch" in lines[0], lines
    # Tracing is the [otel] extra: asking for it without the extra is one clear line too.
    argv = ["gateway", "--otel-endpoint", "http://127.0.0.1:4317", "--codec-addr", "127.0.0.1:1"]
    out = subprocess.run([cli, *argv, "--lm-addr", "127.0.0.1:2"], **here)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.stdout, out.stderr)
    assert "pip install 'moshi-grpc[otel]'" in lines[0], lines


def test_server_commands_hint_at_the_extra_when_torch_is_missing(monkeypatch, capsys) -> None:
    """The same hint without a fresh venv: hide the server modules from the finder."""
    from moshi_grpc import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in SERVER_ONLY else real(n, *a)
    )
    assert cli.main(["lm", "--model", "echo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "moshi-grpc lm" in err[0] and "pip install 'moshi-grpc[server]'" in err[0]
    )
