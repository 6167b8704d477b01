"""Strict loading of official safetensors checkpoints into our modules.

Users with the real weights must get the real model, so loading is all-or-nothing: every
tensor of the file is consumed, none of the module's parameters is left unset, and every
shape matches. Failures name the tensors, so a wrong file is diagnosed in one read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """The checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, on CPU, in their stored dtype."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc


def _preview(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_strict(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    rename: Callable[[str], str | None] | None = None,
    source: str = "checkpoint",
) -> None:
    """Copy `tensors` into `module`'s parameters and buffers, or raise CheckpointError.

    `rename` maps a checkpoint name to the module's state-dict name (None = the tensor is not
    ours, which counts as unexpected). Tensors are cast to each parameter's dtype, so bf16
    checkpoints load into float32 or bfloat16 models alike. Non-persistent buffers are not
    expected in the file.
    """
    target = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in tensors.items():
        key = rename(name) if rename is not None else name
        if key is None or key not in target:
            unexpected.append(name)
        else:
            mapped[key] = tensor
    missing = sorted(set(target) - set(mapped))
    misshaped = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_preview(sorted(unexpected))}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {_preview(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model; " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in mapped.items():
            target[key].copy_(tensor.to(target[key].dtype))
