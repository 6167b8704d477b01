"""Project hygiene: packaging lists every package, lint is clean, layers point down, CLI works."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import pytest
import tomllib
from conftest import REPO_ROOT

ROOTS = {
    "moshi_grpc": "moshi_grpc",
    "moshi_grpc.services": "services",
    "moshi_grpc.clients": "clients",
}


def _packages_on_disk() -> set[str]:
    found = set()
    for prefix, folder in ROOTS.items():
        base = REPO_ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([prefix, *rel.parts]) if rel.parts else prefix)
    return found


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert listed == _packages_on_disk(), "update [tool.setuptools] packages in pyproject.toml"


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


def test_ruff_lint_and_format_clean() -> None:
    ruff = shutil.which("ruff", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("ruff")
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
