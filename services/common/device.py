"""The device a replica runs on: dtype names, synchronisation, free memory, matmul precision.

Everything that differs between a CPU and a CUDA replica and is not the model's math lives
here, so that the engines, the runners and the benchmarks say it once:

- `torch_dtype("bfloat16")`: the `--dtype` names.
- `synchronize(device)`: wait for *that* device's work (a timing must not stop at the launch;
  `torch.cuda.synchronize()` without a device waits on the current device, which is not the
  model's on `--device cuda:1`); a no-op on CPU.
- `free_memory(device)`: bytes free on a CUDA device, asked by index (torch < 2.5 rejects a
  `torch.device` without one).
- `exact_float32(device, dtype)`: a float32 model on CUDA must compute in float32. Ampere
  and later GPUs run float32 matmuls and cuDNN convolutions in TF32 (10-bit mantissa)
  unless told not to, and cuDNN allows it by default: the "exact" fp32 path would then not
  match the reference. Set once at load, process-wide (the flags are global in torch).
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` name; ValueError naming the choices."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; one of {', '.join(DTYPES)}") from None


def cuda_index(device: torch.device | str) -> int:
    """The CUDA device index (`cuda` alone means the current device)."""
    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index


def synchronize(device: torch.device | str) -> None:
    """Wait until `device` finished its queued work (no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(cuda_index(device))


def free_memory(device: torch.device | str) -> int:
    """Bytes free on CUDA `device` now (by index: works on every torch since 2.0)."""
    free, _total = torch.cuda.mem_get_info(cuda_index(device))
    return int(free)


def exact_float32(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Turn TF32 off (matmul and cuDNN) for a float32 model on CUDA; True when it did.

    Half-precision models are not affected by these flags, so a process serving both kinds
    keeps them off too."""
    if torch.device(device).type != "cuda" or dtype != torch.float32:
        return False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return True
