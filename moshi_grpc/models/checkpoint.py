"""Strict loading of official safetensors checkpoints into our modules.

Users with the real weights must get the real model, so loading is all-or-nothing: every
tensor of the file is consumed, none of the module's parameters is left unset, and every
shape matches. Failures name the tensors, so a wrong file is diagnosed in one read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from moshi_grpc.models.validation import listed_problems

log = logging.getLogger(__name__)


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
    problems = listed_problems(
        ("missing", missing), ("unexpected", sorted(unexpected)), ("mis-shaped", misshaped)
    )
    if problems:
        raise CheckpointError(f"{source} does not match the model; " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in mapped.items():
            target[key].copy_(tensor.to(target[key].dtype))


# The reference's module layout: one projection per step (`in_projs.N`, `out_projs.N`).
_MODULE_PROJ = re.compile(r"^(.*\.self_attn)\.(in_projs|out_projs)\.(\d+)\.weight$")
_FUSED_PROJ = {"in_projs": ".in_proj_weight", "out_projs": ".out_proj.weight"}


def fold_attention_layouts(
    tensors: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Attention projections under the published (fused) names, whichever layout the file has.

    Published checkpoints carry `self_attn.in_proj_weight` and `self_attn.out_proj.weight`.
    Files saved from the reference's modules (moshi >= 0.2, fine-tuning tools) carry
    `self_attn.in_projs.N.weight` and `self_attn.out_projs.N.weight`, one per step (only
    N = 0 where the weights are shared by all steps); stacked along rows they are the fused
    tensor. `self_attn.in_proj.weight` is a third spelling of the fused one. A file that
    spells one projection in two layouts is refused: which one holds the weights is unknown.
    Everything else passes through; `load_state_strict` then checks the set is complete.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}

    def put(key: str, tensor: torch.Tensor, spelled: str) -> None:
        if key in out:
            raise CheckpointError(
                f"{source}: {spelled} and {origin[key]} are one projection in two attention "
                "layouts; keep one (fused `in_proj_weight`/`out_proj.weight` or the "
                "reference's `in_projs.N`/`out_projs.N`)"
            )
        out[key] = tensor
        origin[key] = spelled

    split: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _MODULE_PROJ.match(name)
        if m:
            split.setdefault((m.group(1), m.group(2)), {})[int(m.group(3))] = t
        elif name.endswith(".self_attn.in_proj.weight"):
            put(name.removesuffix(".in_proj.weight") + ".in_proj_weight", t, name)
        else:
            put(name, t, name)
    for (prefix, kind), parts in split.items():
        steps = sorted(parts)
        if steps != list(range(len(steps))):
            raise CheckpointError(f"{source}: {prefix}.{kind}: non-contiguous step indices {steps}")
        fused = torch.cat([parts[i] for i in steps], 0)
        spelled = f"{prefix}.{kind}.{steps[0] if len(steps) == 1 else f'[0-{steps[-1]}]'}.weight"
        put(prefix + _FUSED_PROJ[kind], fused, spelled)
    return out


_DEPFORMER_STEP = re.compile(
    r"^(depformer_in|linears|depformer_emb)\.(\d+)\.|^depformer\.layers\.\d+\.gating\.(\d+)\."
)


def served_depformer_steps(
    tensors: dict[str, torch.Tensor], q: int, steps: int, d: int, source: str
) -> dict[str, torch.Tensor]:
    """A PersonaPlex checkpoint's depformer (`steps` of `d` wide) cut to Moshi's own `q`
    steps (0..q-1).

    Its steps dep_q..n_q-1 predict the user's codebooks, which its generator always
    teacher-forces; the depformer is causal across steps, so Moshi's steps never see them
    and dropping them changes none of Moshi's tokens (greedy; tests/test_persona.py). The
    stacked attention projections keep their first dep_q steps' rows. What is left unused
    is named in one log line; everything else must still match the model strictly."""
    kept: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, t in tensors.items():
        m = _DEPFORMER_STEP.match(key)
        if m is not None:
            step = int(m.group(2) if m.group(2) is not None else m.group(3))
            limit = q - 1 if m.group(1) == "depformer_emb" else q
            if step >= limit:
                dropped.append(key)
                continue
        elif key.startswith("depformer.layers.") and ".self_attn." in key:
            rows = d * (3 if key.endswith("in_proj_weight") else 1)
            if t.shape[0] == steps * rows:  # (else the strict load names the mis-shape)
                dropped.append(f"{key}[{q * rows}:{t.shape[0]}]")
                t = t[: q * rows]
        kept[key] = t
    log.info(
        "%s: PersonaPlex depformer steps %d..%d (the user's codebooks, teacher-forced by the "
        "reference) are not used (%d tensors and row ranges): depformer_in.%d..%d, "
        "linears.%d..%d, depformer_emb.%d..%d, depformer.layers.*.gating.%d..%d, rows "
        "%d..%d of depformer.layers.*.self_attn.in_proj_weight and %d..%d of its "
        "out_proj.weight",
        source,
        q,
        steps - 1,
        len(dropped),
        q,
        steps - 1,
        q,
        steps - 1,
        q - 1,
        steps - 2,
        q,
        steps - 1,
        q * 3 * d,
        steps * 3 * d - 1,
        q * d,
        steps * d - 1,
    )
    return kept
