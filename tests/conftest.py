"""Shared fixtures: free ports, loopback addresses, tiny deterministic settings.

Later suites start real grpc.aio servers on 127.0.0.1 port 0 and talk to them over real
channels; nothing here mocks the transport.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Two CPU cores in CI: keep torch from oversubscribing them across test processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for subprocess servers)."""
    return _free_port()


@pytest.fixture
def free_port_factory():
    """Call it for as many distinct free ports as a test needs."""
    return _free_port


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def loopback() -> str:
    """Host that every test server binds to: loopback only, never another address."""
    return "127.0.0.1"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of tiny models: threads only add pool synchronisation on a busy 2-core
    box. Opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_golden() -> dict:
    """The reference's greedy run on the committed LM fixture (tools/make_lm_golden.py), with
    the user codes as a tensor and the paths of the weights and config it was made from."""
    import json

    import torch

    d = FIXTURES / "lm"
    data = json.loads((d / "golden.json").read_text())
    data["codes"] = torch.tensor(data["user_codes"])
    data["weights"] = d / "model.safetensors"
    data["config"] = d / "config.json"
    return data


@pytest.fixture(scope="module")
def mimi_golden() -> dict:
    """The reference's codes and pcm on the committed tiny Mimi fixture
    (tools/make_mimi_golden.py), its input audio as float, its meta and the weights' path."""
    import json

    from safetensors.torch import load_file

    d = FIXTURES / "mimi"
    g = load_file(str(d / "golden.safetensors"))
    g["audio"] = g["audio_int16"].float() / 32767
    g["meta"] = json.loads((d / "meta.json").read_text())
    g["weights"] = d / "weights.safetensors"
    return g


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """Small, deterministic thread use per test (the CI machine has 2 cores)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)
