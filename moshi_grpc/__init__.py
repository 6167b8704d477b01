"""moshi-grpc: production gRPC serving for Moshi (Mimi codec + Moshi LM).

The public Python API is importable from here:

- `load_mimi(...)`: the Mimi codec (offline encode/decode and batched streaming).
- `load_lm(...)`: the Moshi LM and its batched streaming generator.
- `ConverseClient`, `AsyncConverseClient`: the SDK for the gateway's Converse API.

Names resolve on first use, so `import moshi_grpc` does not import torch or grpc.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_mimi": "moshi_grpc.models.mimi",
    "load_lm": "moshi_grpc.models.lm",
    "LMGen": "moshi_grpc.models.lm_gen",
    "ConverseClient": "moshi_grpc.clients",
    "AsyncConverseClient": "moshi_grpc.clients",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moshi_grpc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
