"""Make the Moshi LM golden fixtures with the public reference (PyPI `moshi` 0.2.13).

Run it with the reference venv's python, from the repository root:

    PY=$(../shared/tools/reference-venv)      # prints that venv's python (creates it if needed)
    NO_TORCH_COMPILE=1 $PY tools/make_lm_golden.py

(here the venv already exists: `../shared/tools/reference-venv /work/.venv-reference`).

It writes tests/fixtures/lm/:
- config.json: a small moshiko-style LM config in kyutai's official config.json format
  (real stream layout: 16 audio streams, 8 generated, real delays; tiny widths/vocabularies,
  context 10 so the ring KV cache wraps within the run);
- model.safetensors: seeded random weights under the official tensor names, stored in
  bfloat16 like the published checkpoints; the reference loads this very file back before it
  generates, so the names are proven to be ones it accepts;
- golden.json: random user codes for each step and the reference LMGen's greedy
  (temperature 0) output per step: text token and Moshi's 8 codes (null before max delay).

The reference is an oracle only: nothing of it is imported by the project.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lm"
STEPS = 32
SEED = 1234

CONFIG = {
    "dim": 32,
    "text_card": 96,
    "existing_text_padding_id": 3,
    "existing_text_end_padding_id": 0,
    "n_q": 16,
    "dep_q": 8,
    "card": 64,
    "num_heads": 2,
    "num_layers": 2,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 10,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 16,
    "depformer_dim_feedforward": 66,
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    "moshi_name": "model.safetensors",
}


def official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the published checkpoint names (fused per-step projections)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, t in state.items():
        for split, official in (
            (".in_projs.", ".in_proj_weight"),
            (".out_projs.", ".out_proj.weight"),
        ):
            if split in name:
                prefix, rest = name.split(split)
                fused.setdefault(prefix + official, []).append((int(rest.split(".")[0]), t))
                break
        else:
            out[name] = t
    for name, parts in fused.items():
        out[name] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], 0)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def main() -> int:
    from moshi.models.lm import LMGen
    from moshi.models.loaders import get_moshi_lm

    torch.manual_seed(SEED)
    lm_kwargs = {k: v for k, v in CONFIG.items() if k != "moshi_name"}
    model = get_moshi_lm(None, lm_kwargs=lm_kwargs, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):  # RMSNorm scales: not all ones, so they are tested
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "self_attn" in name or "gating" in name:
                # the reference leaves these at PyTorch's default init; make them seeded normal
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    OUT.mkdir(parents=True, exist_ok=True)
    weights = OUT / "model.safetensors"
    save_file(official_state(model), str(weights))
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")

    # Generate with the reference from the saved file (bf16 values loaded into float32).
    lm = get_moshi_lm(str(weights), lm_kwargs=lm_kwargs, device="cpu", dtype=torch.float32)
    gen = LMGen(lm, use_sampling=False, temp=0.0, temp_text=0.0)
    g = torch.Generator().manual_seed(SEED + 1)
    n_user = CONFIG["n_q"] - CONFIG["dep_q"]
    codes = torch.randint(0, CONFIG["card"], (STEPS, n_user), generator=g)
    text: list[int | None] = []
    audio: list[list[int] | None] = []
    with gen.streaming(1), torch.no_grad():
        for t in range(STEPS):
            out = gen.step(codes[t][None, :, None])
            if out is None:
                text.append(None)
                audio.append(None)
            else:
                text.append(int(out[0, 0, 0]))
                audio.append([int(x) for x in out[0, 1:, 0]])
    golden = {
        "reference": "moshi 0.2.13 (PyPI), LMGen greedy (temperature 0), float32, batch 1",
        "steps": STEPS,
        "user_codes": codes.tolist(),
        "text": text,
        "audio": audio,
    }
    (OUT / "golden.json").write_text(json.dumps(golden) + "\n")
    print(f"wrote {OUT} ({sum(f.stat().st_size for f in OUT.iterdir())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
