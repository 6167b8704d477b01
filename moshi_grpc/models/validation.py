"""Input checks of the models' public calls and configurations, kept out of the model files.

The models (`mimi.py`, `lm.py`) compute; these functions decide, before any computation,
whether an input is one the model can take, and raise a `ValueError` subclass naming what
is wrong (mapped to a gRPC status by the services):

- the codec's audio, codes, batches, masks and rows (`MimiInputError`). They read tensor
  values (NaN, code ranges), so they run on the host before a step, never inside a
  captured one: the checked calls (`step`, `encode`, `decode`) call them, the
  `step_unchecked` paths do not;
- the LM's kyutai `config.json` (`LMConfigError`): every key known, none missing, and only
  the variants this implementation runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moshi_grpc.models.lm import LMConfig

__all__ = [
    "LMConfigError",
    "MimiInputError",
    "check_active",
    "check_batch",
    "check_codes",
    "check_pcm",
    "check_lm_config",
    "check_rows",
    "parse_lm_config",
]


def listed_problems(*parts: tuple[str, list[str]], limit: int = 12) -> list[str]:
    """ "N what: a, b, ..." for each non-empty `(what, names)` part (at most `limit` names
    shown each): how a refused file or config names everything wrong at once."""
    out = []
    for what, names in parts:
        if names:
            shown = ", ".join(names[:limit])
            more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
            out.append(f"{len(names)} {what}: {shown}{more}")
    return out


class MimiInputError(ValueError):
    """Audio or codes given to the codec have the wrong shape, dtype, length or values."""


def check_pcm(pcm, offline: bool, active: torch.Tensor | None = None) -> None:
    """Float audio, finite on every row that advances; offline (B, 1, T) and not empty."""
    if not isinstance(pcm, torch.Tensor) or not pcm.dtype.is_floating_point:
        raise MimiInputError(f"pcm must be a float tensor, got {getattr(pcm, 'dtype', type(pcm))}")
    if offline:
        if pcm.dim() != 3 or pcm.shape[1] != 1:
            raise MimiInputError(f"pcm must have shape (B, 1, T), got {tuple(pcm.shape)}")
        if pcm.shape[-1] == 0 or pcm.shape[0] == 0:
            raise MimiInputError("pcm is empty")
    finite = torch.isfinite(pcm).flatten(1).all(dim=1)
    if active is not None:
        finite = finite | ~active.to(finite.device)
    if not bool(finite.all()):
        raise MimiInputError("pcm contains NaN or Inf")


def check_codes(
    codes, k: int, card: int, offline: bool, active: torch.Tensor | None = None
) -> None:
    """Integer codes of `k` codebooks in [0, card) on every row that advances; offline
    (B, K, F) and not empty, streaming (B, K)."""
    if (
        not isinstance(codes, torch.Tensor)
        or codes.dtype.is_floating_point
        or codes.dtype == torch.bool
    ):
        raise MimiInputError(
            f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}"
        )
    if codes.dim() != (3 if offline else 2):
        want = "(B, K, F)" if offline else "(N, K)"
        raise MimiInputError(f"codes must have shape {want}, got {tuple(codes.shape)}")
    if codes.shape[1] != k:
        raise MimiInputError(f"expected {k} codebooks, got {codes.shape[1]}")
    if offline and (codes.shape[-1] == 0 or codes.shape[0] == 0):
        raise MimiInputError("codes are empty")
    bad = ((codes < 0) | (codes >= card)).flatten(1).any(dim=1)
    if active is not None:
        bad = bad & active.to(bad.device)
    if bool(bad.any()):
        raise MimiInputError(f"codes out of range 0..{card - 1}")


def check_batch(x, what: str, width: int, num_rows: int, *, exact: bool = True) -> int:
    """A streaming input (B, width) for a row prefix, 1 <= B <= num_rows; B. With `exact`
    False the width is left to a check with a more specific message."""
    ok = isinstance(x, torch.Tensor) and x.dim() == 2 and 1 <= x.shape[0] <= num_rows
    if not ok or (exact and x.shape[1] != width):
        raise MimiInputError(
            f"{what} must have shape (B, {width}) with 1 <= B <= {num_rows}, "
            f"got {tuple(getattr(x, 'shape', ()))}"
        )
    return x.shape[0]


def check_active(active, b: int) -> None:
    """`active`, when given, is a (B,) bool mask."""
    if active is None:
        return
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
        raise MimiInputError("active must be a bool tensor")
    if active.shape != (b,):
        raise MimiInputError(f"active must have shape ({b},), got {tuple(active.shape)}")


def check_rows(rows: Iterable[int], num_rows: int) -> list[int]:
    """Row indices in [0, num_rows), as a list."""
    rows = list(rows)
    if any(not 0 <= int(r) < num_rows for r in rows):
        raise MimiInputError(f"rows must be in 0..{num_rows - 1}, got {rows}")
    return [int(r) for r in rows]


# --- the LM's configuration ----------------------------------------------------------------


class LMConfigError(ValueError):
    """The LM configuration is malformed, incomplete or asks for an unsupported variant."""


# Keys of a kyutai config.json that describe files or tooling, not the network: accepted and
# kept in `LMConfig.extra` so a real config.json loads as is.
_METADATA_KEYS = {
    "moshi_name",
    "mimi_name",
    "mimi_config_name",
    "tokenizer_name",
    "lora_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "stt_config",
    "model_id",
    "depformer_causal",  # deprecated upstream, ignored there too
}

# Keys the reference accepts whose only supported value here is the neutral one.
_NEUTRAL_KEYS: dict[str, Any] = {
    "text_card_out": None,
    "demux_second_stream": False,
    "demux_second_text_stream": False,
    "norm_emb": False,
    "bias_proj": False,
    "depformer_norm": None,
    "depformer_weights_per_step_schedule": None,
    "depformer_low_rank_embeddings": None,
    "extra_heads_num_heads": 0,
    "extra_heads_dim": 6,
    "kv_repeat": 1,
    "depformer_kv_repeat": 1,
    "conditioners": None,
    "fuser": None,
    "cross_attention": False,
    "lora": False,
    "quantize": False,
}


def parse_lm_config(cls: type[LMConfig], raw: dict[str, Any]) -> LMConfig:
    """`cls` (an `LMConfig`) from an official config.json dict, checked."""
    if not isinstance(raw, dict):
        raise LMConfigError(f"LM config must be a JSON object, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)} - {"extra", "depformer_steps"}
    optional = {"existing_text_end_padding_id"}
    unknown = sorted(set(raw) - names - _METADATA_KEYS - set(_NEUTRAL_KEYS))
    missing = sorted(names - optional - set(raw))
    problems = listed_problems(("unknown keys", unknown), ("missing keys", missing))
    if problems:
        raise LMConfigError("invalid LM config; " + "; ".join(problems))
    for key, neutral in _NEUTRAL_KEYS.items():
        if key == "extra_heads_dim":  # meaningless without extra heads
            continue
        if key in raw and raw[key] != neutral and raw[key] not in (None, [], {}):
            raise LMConfigError(f"unsupported LM config value {key}={raw[key]!r}")
    kwargs = {k: raw[k] for k in names if k in raw}
    kwargs["delays"] = list(kwargs["delays"])
    if kwargs["dep_q"] == kwargs["n_q"] and isinstance(kwargs["n_q"], int) and kwargs["n_q"] > 1:
        # PersonaPlex's layout: a depformer over every stream, the second half the user's.
        kwargs["depformer_steps"] = kwargs["n_q"]
        kwargs["dep_q"] = kwargs["n_q"] // 2
    extra = {k: raw[k] for k in raw if k in _METADATA_KEYS}
    cfg = cls(**kwargs, extra=extra)
    cfg.validate()
    return cfg


def check_lm_config(cfg: LMConfig) -> None:
    """Reject values the LM does not run (rather than run them wrongly)."""
    fixed = {
        "causal": (cfg.causal, True),
        "layer_scale": (cfg.layer_scale, None),
        "depformer_layer_scale": (cfg.depformer_layer_scale, None),
        "gating": (cfg.gating, "silu"),
        "depformer_gating": (cfg.depformer_gating, "silu"),
        "positional_embedding": (cfg.positional_embedding, "rope"),
        "depformer_pos_emb": (cfg.depformer_pos_emb, "none"),
        "depformer_multi_linear": (cfg.depformer_multi_linear, True),
        "depformer_weights_per_step": (cfg.depformer_weights_per_step, True),
    }
    for key, (value, want) in fixed.items():
        if value != want:
            raise LMConfigError(f"unsupported LM config value {key}={value!r} (need {want!r})")
    if cfg.norm not in ("rms_norm_f32", "rms_norm"):
        raise LMConfigError(f"unsupported norm {cfg.norm!r} (rms_norm_f32 or rms_norm)")
    ints = {
        "dim": cfg.dim,
        "text_card": cfg.text_card,
        "n_q": cfg.n_q,
        "dep_q": cfg.dep_q,
        "card": cfg.card,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "context": cfg.context,
        "depformer_dim": cfg.depformer_dim,
        "depformer_num_heads": cfg.depformer_num_heads,
        "depformer_num_layers": cfg.depformer_num_layers,
    }
    for key, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LMConfigError(f"LM config {key} must be a positive integer, got {value!r}")
    if cfg.dep_q > cfg.n_q:
        raise LMConfigError(f"dep_q ({cfg.dep_q}) cannot exceed n_q ({cfg.n_q})")
    if cfg.depformer_steps is not None and (
        cfg.depformer_steps != cfg.n_q or 2 * cfg.dep_q != cfg.n_q
    ):
        raise LMConfigError(
            "a depformer over every stream (PersonaPlex) needs dep_q = n_q, an even n_q, "
            f"got depformer_steps={cfg.depformer_steps}, dep_q={cfg.dep_q}, n_q={cfg.n_q}"
        )
    if cfg.dim % cfg.num_heads or (cfg.dim // cfg.num_heads) % 2:
        raise LMConfigError("dim must split into num_heads heads of even size")
    if cfg.depformer_dim % cfg.depformer_num_heads:
        raise LMConfigError("depformer_dim must be divisible by depformer_num_heads")
    if len(cfg.delays) != cfg.num_codebooks or any(
        not isinstance(d, int) or d < 0 for d in cfg.delays
    ):
        raise LMConfigError(
            f"delays must be {cfg.num_codebooks} non-negative integers, got {cfg.delays!r}"
        )
    for key in ("existing_text_padding_id", "existing_text_end_padding_id"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or not 0 <= value < cfg.text_card:
            raise LMConfigError(f"{key} must be a text token id, got {value!r}")
