"""Hugging Face transformers `MimiModel` tensor names <-> the official checkpoint names.

`load_mimi` reads the official names (`tokenizer-e351c8d8-checkpoint125.safetensors`); a
file saved from transformers' `MimiModel` renames every module and splits and permutes the
attention projections. `hf_to_official` undoes both, so either file loads into the same
model, strictly; `official_to_hf` is its inverse (the tests build a transformers-layout
file with it, following transformers' own converter).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moshi_grpc.models.mimi import MimiConfig

__all__ = ["hf_to_official", "is_hf_layout", "official_to_hf"]

_HF_RENAMES = [
    # (Hugging Face transformers MimiModel name pattern, official name), applied in order
    (
        r"^(encoder|decoder)\.layers\.(\d+)\.block\.(\d+)\.conv\.",
        r"\1.model.\2.block.\3.conv.conv.",
    ),
    (r"^encoder\.layers\.(\d+)\.conv\.", r"encoder.model.\1.conv.conv."),
    (r"^downsample\.conv\.", "downsample.conv.conv.conv."),
    (r"^upsample\.conv\.", "upsample.convtr.convtr.convtr."),
    (r"^(encoder|decoder)_transformer\.layers\.", r"\1_transformer.transformer.layers."),
    (r"\.mlp\.fc1\.", ".linear1."),
    (r"\.mlp\.fc2\.", ".linear2."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.input_layernorm\.", ".norm1."),
    (r"\.post_attention_layernorm\.", ".norm2."),
    (r"\.self_attn_layer_scale\.", ".layer_scale_1."),
    (r"\.mlp_layer_scale\.", ".layer_scale_2."),
    (r"^quantizer\.semantic_residual_vector_quantizer\.layers\.", "quantizer.rvq_first.vq.layers."),
    (r"^quantizer\.semantic_residual_vector_quantizer\.", "quantizer.rvq_first."),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.layers\.", "quantizer.rvq_rest.vq.layers."),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.", "quantizer.rvq_rest."),
    (r"\.codebook\.initialized$", "._codebook._initialized"),
    (r"\.codebook\.embed_sum$", "._codebook.embedding_sum"),
    (r"\.codebook\.cluster_usage$", "._codebook.cluster_usage"),
]


def is_hf_layout(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the names are transformers' (its encoder and quantizer prefixes)."""
    return any(
        k.startswith(("encoder.layers.", "quantizer.semantic_residual_vector_quantizer."))
        for k in tensors
    )


def hf_to_official(tensors: dict[str, torch.Tensor], config: MimiConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers `MimiModel` state dict to the official tensor names.

    transformers splits `in_proj_weight` into q/k/v and permutes q and k rows from
    interleaved to half-split RoPE; this undoes both.
    """
    h = config.num_heads
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.weight$", name)
        if m:
            qkv.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        new = name
        if re.match(r"^decoder\.layers\.\d+\.conv\.", new):
            new = re.sub(r"^decoder\.layers\.(\d+)\.conv\.", r"decoder.model.\1.CONV.", new)
        for pat, rep in _HF_RENAMES:
            new = re.sub(pat, rep, new)
        out[new] = t
    # decoder convs and transposed convs share the HF name `conv`; the official name depends
    # on the shape (transposed weights are (Cin, Cout, K) with an upsampling kernel)
    for name in [n for n in out if ".CONV." in n]:
        t = out.pop(name)
        idx = int(name.split(".")[2])
        kind = "convtr.convtr" if _decoder_is_convtr(config, idx) else "conv.conv"
        out[name.replace("CONV", kind)] = t
    for prefix, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            for p, t in parts.items():
                out[f"{prefix}.self_attn.{p}_proj.weight"] = t
            continue
        dim = parts["q"].shape[0]

        def unpermute(w: torch.Tensor, d=dim) -> torch.Tensor:
            return w.view(h, 2, d // h // 2, w.shape[1]).transpose(1, 2).reshape(d, w.shape[1])

        for pat, rep in _HF_RENAMES:
            prefix = re.sub(pat, rep, prefix)
        out[f"{prefix}.self_attn.in_proj_weight"] = torch.cat(
            [unpermute(parts["q"]), unpermute(parts["k"]), parts["v"]]
        )
    return out


def official_to_hf(tensors: dict[str, torch.Tensor], config: MimiConfig) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_official` (used by tests; follows the transformers converter)."""
    h = config.num_heads
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        new = name
        for a, b in [
            ("conv.conv.conv", "conv"), ("convtr.convtr.convtr", "conv"),
            ("conv.conv", "conv"), ("convtr.convtr", "conv"),
            ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
            ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
            ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
            ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
            ("_codebook", "codebook"), ("_initialized", "initialized"),
            ("embedding_sum", "embed_sum"), ("encoder.model", "encoder.layers"),
            ("decoder.model", "decoder.layers"),
            ("encoder_transformer.transformer", "encoder_transformer"),
            ("decoder_transformer.transformer", "decoder_transformer"),
            ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
            ("self_attn.out_proj", "self_attn.o_proj"), ("norm1", "input_layernorm"),
            ("norm2", "post_attention_layernorm"), ("layer_scale_1", "self_attn_layer_scale"),
            ("layer_scale_2", "mlp_layer_scale"),
        ]:  # fmt: skip
            new = new.replace(a, b)
        if new.endswith("in_proj_weight"):
            d = t.shape[0] // 3

            def permute(w: torch.Tensor, d=d) -> torch.Tensor:
                return w.view(h, d // h // 2, 2, w.shape[1]).transpose(1, 2).reshape(d, w.shape[1])

            base = new[: -len("in_proj_weight")]
            out[base + "q_proj.weight"] = permute(t[:d])
            out[base + "k_proj.weight"] = permute(t[d : 2 * d])
            out[base + "v_proj.weight"] = t[2 * d :]
        else:
            out[new] = t
    return out


def _decoder_is_convtr(config: MimiConfig, idx: int) -> bool:
    # decoder.model: 0 conv, then per ratio [ELU, convtr, resblocks...]
    pos = 1
    for _ in config.ratios:
        if idx == pos + 1:
            return True
        pos += 2 + config.n_residual_layers
    return False
