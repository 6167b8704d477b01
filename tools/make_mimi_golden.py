"""Golden fixtures for our Mimi codec, made with the public reference (PyPI `moshi` 0.2.13).

Run it with the reference venv's python (it imports `moshi`, not `moshi_grpc`):

    PY=$(../shared/tools/reference-venv)        # from /work/main; prints the venv's python
    $PY tools/make_mimi_golden.py               # -> tests/fixtures/mimi/ (tiny config, committed)
    $PY tools/make_mimi_golden.py --full        # -> tests/fixtures/mimi/full/ (79 M config)

The full (79 M) config's weights are too large to commit, so `--full` commits none: its
weights are `seeded_weights(tensors.json, seed)`, a recipe with no data in it (one CPU
torch.Generator, tensors drawn in sorted name order into the official names), which
tests/test_mimi.py runs again in our venv to rebuild the same bits. Committed: the tensor
names and shapes the reference's checkpoint has (`tensors.json`), the audio as int16, the
reference's offline codes and the first frames of its offline decode (`golden.safetensors`),
and the seed (`meta.json`), about 0.3 MB. The module imports `moshi` only inside the
functions that need it, so our venv can import the recipe from this file.

The tiny fixture:

The reference MimiModel is built with the config's hyper-parameters, given seeded random
weights (scaled so every layer matters and codes spread over the codebooks), and saved with
the official checkpoint tensor names (`weights.safetensors`, reloaded strictly into a fresh
reference model as a check). That reloaded model's own `state_dict()` is saved too
(`weights_modules.safetensors`): the same weights in the reference's module layout
(`self_attn.in_projs.0.weight`, `out_projs.0.weight`), what moshi >= 0.2 and fine-tuning
tools write; `load_mimi` must read both. Synthetic speech-like audio (voiced harmonics with a moving
pitch, syllable envelopes, noise bursts) goes through the reference:
offline codes, offline decode and frame-by-frame streaming codes (`golden.safetensors`);
`meta.json` records where the reference's own streaming departs from its offline output
(its KV ring keeps 250 steps where a 2-step frame needs 251, see moshi_grpc/models/mimi.py).
Codebooks are re-drawn until no code sits on a near-tie (`--min-gap`), so the fixture tests
the model rather than float rounding luck. The reference is an oracle only; nothing of it
is copied.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIGS = {
    # must match moshi_grpc.models.mimi.PRESETS
    "tiny": dict(dimension=32, n_filters=4, heads=2, layers=2, ff=64, context=10, cb_dim=4, n_q=8),
    "mimi": dict(
        dimension=512, n_filters=64, heads=8, layers=8, ff=2048, context=250, cb_dim=256, n_q=32
    ),
}


def reference_config(name: str) -> dict:
    from moshi.models import loaders

    c = CONFIGS[name]
    seanet = dict(loaders._seanet_kwargs, dimension=c["dimension"], n_filters=c["n_filters"])
    quantizer = dict(
        loaders._quantizer_kwargs,
        dimension=c["cb_dim"], n_q=c["n_q"],
        input_dimension=c["dimension"], output_dimension=c["dimension"],
    )  # fmt: skip
    transformer = dict(
        loaders._transformer_kwargs,
        d_model=c["dimension"], num_heads=c["heads"], num_layers=c["layers"],
        dim_feedforward=c["ff"], context=c["context"],
        input_dimension=c["dimension"], output_dimensions=[c["dimension"]],
    )  # fmt: skip
    return dict(loaders._mimi_config, seanet=seanet, quantizer=quantizer, transformer=transformer)


def speech_like(batch: int, samples: int, seed: int, sr: int = 24000) -> torch.Tensor:
    """(B, 1, T) float32: harmonic 'vowels' with gliding pitch, 4 Hz syllables, fricatives."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float64) / sr
    rows = []
    for _ in range(batch):
        f0 = 110 + 80 * torch.rand(1, generator=g).item()
        pitch = f0 * (1 + 0.15 * torch.sin(2 * math.pi * 0.7 * t + 6 * torch.rand(1, generator=g)))
        phase = 2 * math.pi * torch.cumsum(pitch, 0) / sr
        voiced = sum(torch.sin(k * phase) / k for k in range(1, 12))
        syll = torch.sin(2 * math.pi * (3 + torch.rand(1, generator=g)) * t).clamp(min=0) ** 2
        noise = torch.randn(samples, generator=g, dtype=torch.float64)
        burst = (torch.sin(2 * math.pi * 1.3 * t) > 0.8).double()
        x = 0.25 * voiced * syll + 0.05 * noise * burst
        rows.append(x)
    pcm = torch.stack(rows).unsqueeze(1)
    # int16-representable values, so the fixture can store the audio as int16 exactly
    return (torch.round(pcm.clamp(-1, 1) * 32767) / 32767).float()


def randomize(model: torch.nn.Module, audio: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
                p.copy_(0.05 + 0.25 * torch.rand(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else max(p.numel(), 1)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        # codebooks spread like the residuals they quantize (as a k-means init would)
        emb = model._encode_to_unquantized_latent(audio)
        for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
            r = rvq.input_proj(emb).transpose(1, 2).reshape(-1, rvq.dimension)  # (B*T, D)
            for layer in rvq.vq.layers:
                cb = layer._codebook
                usage = 0.5 + torch.rand(cb.cluster_usage.shape, generator=g)
                centroids = r.mean(0) + r.std(0) * torch.randn(cb.embedding_sum.shape, generator=g)
                cb.cluster_usage.copy_(usage)
                cb.embedding_sum.copy_(centroids * usage[:, None])
                cb._initialized.fill_(1.0)
                cb.register_buffer("_embedding", None, persistent=False)
                r = r - layer.decode(layer.encode(r.T[None]))[0].T


def min_relative_gap(model: torch.nn.Module, audio: torch.Tensor) -> float:
    """Smallest (2nd nearest - nearest) squared centroid distance, relative to |r|^2 + |e|^2.

    Float rounding differs between implementations (~1e-6 relative); a fixture whose codes
    sit on near-ties would test luck, so `main` re-draws the codebooks until this is large.
    """
    gap = float("inf")
    with torch.no_grad():
        emb = model._encode_to_unquantized_latent(audio)
        for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
            r = rvq.input_proj(emb).transpose(1, 2).reshape(-1, rvq.dimension)
            for layer in rvq.vq.layers[: rvq.n_q]:
                e = layer._codebook.embedding.double()
                rd = r.double()
                d2 = rd.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * rd @ e.T
                top = d2.topk(2, largest=False).values
                # float32 error of |r|^2 + |e|^2 - 2 r.e scales with |r|^2 + |e|^2
                scale = rd.pow(2).sum(-1) + e.pow(2).sum(-1).max()
                gap = min(gap, ((top[:, 1] - top[:, 0]) / scale).min().item())
                r = r - layer.decode(layer.encode(r.T[None]))[0].T
    return gap


def official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's module names -> the published checkpoint's tensor names."""
    out = {}
    for k, v in state.items():
        k = k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
        k = k.replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")
        out[k] = v.detach().contiguous().clone()
    return out


# Scale of the full fixture's codebook centroids (in the quantizer's 256-d space): about
# the spread of the residuals the seeded encoder gives, so codes use many entries.
CENTROID_STD = 0.1


def seeded_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Mimi weights from a seed alone, bit for bit the same in any venv with this torch.

    One CPU `torch.Generator`, tensors drawn in sorted name order, float32 throughout:
    matrices and vectors N(0, 1/fan_in), layer scales U(0.05, 0.3), codebook usage
    U(0.5, 1.5) and centroids N(0, CENTROID_STD^2) stored as EMA sums (centroid x usage),
    codebooks marked initialized. No forward pass is involved (that would round differently
    in the two implementations), so the test can rebuild what the reference was given.
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):  # "cluster_usage" sorts before its "embedding_sum"
        shape = tuple(shapes[name])
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "_initialized":
            t = torch.ones(shape)
        elif leaf == "scale":  # layer_scale_{1,2}.scale
            t = 0.05 + 0.25 * torch.rand(shape, generator=g)
        elif leaf == "cluster_usage":
            t = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "embedding_sum":
            usage = out[name[: -len(leaf)] + "cluster_usage"]
            t = CENTROID_STD * torch.randn(shape, generator=g) * usage[:, None]
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[name] = t.contiguous()
    return out


def make_full(args: argparse.Namespace) -> None:
    """The 79 M config with `seeded_weights`: re-drawn (seed + attempt) until no code sits
    on a near-tie; commits names/shapes, audio, the reference's codes and decode head."""
    from moshi.models import loaders

    cfg = reference_config("mimi")
    n_q = CONFIGS["mimi"]["n_q"]
    frame = 1920
    frames = round(args.seconds * 24000 / frame)
    audio = speech_like(1, frames * frame, args.seed)
    model = loaders.get_mimi(None, mimi_config=cfg, num_codebooks=n_q)
    shapes = {k: list(v.shape) for k, v in official_names(model.state_dict()).items()}
    for attempt in range(50):
        weights_seed = args.seed + attempt
        # a fresh model per draw: the reference caches each codebook's centroids on first use
        model = loaders.get_mimi(None, mimi_config=cfg, num_codebooks=n_q)
        model.load_state_dict(seeded_weights(shapes, weights_seed), strict=True)
        model.eval()
        gap = min_relative_gap(model, audio)
        print(f"weights seed {weights_seed}: smallest relative centroid gap {gap:.2e}")
        if gap > args.min_gap:
            break
    with torch.no_grad():
        codes = model.encode(audio)
        pcm = model.decode(codes)
    head = min(args.pcm_frames, frames)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tensors.json").write_text(json.dumps(shapes, indent=0, sort_keys=True) + "\n")
    golden = {
        "audio_int16": torch.round(audio * 32767).to(torch.int16).contiguous(),
        "codes": codes.to(torch.int16).contiguous(),  # < 2048
        "pcm_head": pcm[..., : head * frame].contiguous(),
    }
    save_file(golden, str(args.out / "golden.safetensors"))
    spread = [len(set(codes[:, k].flatten().tolist())) for k in range(n_q)]
    meta = {
        "config": "mimi",
        "reference": "moshi 0.2.13 (PyPI)",
        "recipe": "tools/make_mimi_golden.py:seeded_weights",
        "seed": args.seed,
        "weights_seed": weights_seed,
        "min_relative_centroid_gap": gap,
        "frames": frames,
        "pcm_head_frames": head,
        "num_codebooks": n_q,
        "distinct_codes_per_codebook": spread,
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/mimi"))
    ap.add_argument("--seconds", type=float, default=1.2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--min-gap",
        type=float,
        default=None,
        help="re-draw below this tie margin (1e-5; --full 3e-5)",
    )
    ap.add_argument(
        "--full", action="store_true", help="the 79 M config from seeded_weights (no weights saved)"
    )
    ap.add_argument("--pcm-frames", type=int, default=12, help="--full: decoded frames committed")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    if args.full:
        if args.out == Path("tests/fixtures/mimi"):
            args.out = args.out / "full"
        if args.seconds == 1.2:
            args.seconds = 3.2
        # wider than the tiny fixture's: the CPU forms round the 512-d convolutions differently
        args.min_gap = 3e-5 if args.min_gap is None else args.min_gap
        make_full(args)
        return
    args.min_gap = 1e-5 if args.min_gap is None else args.min_gap
    from moshi.models import loaders

    cfg = reference_config(args.config)
    frame = 1920
    frames = round(args.seconds * 24000 / frame)
    audio = speech_like(args.batch, frames * frame, args.seed)

    model = loaders.get_mimi(None, mimi_config=cfg, num_codebooks=CONFIGS[args.config]["n_q"])
    for attempt in range(50):
        randomize(model, audio, args.seed + attempt)
        gap = min_relative_gap(model, audio)
        if gap > args.min_gap:
            break
    print(f"weights seed {args.seed + attempt}: smallest relative centroid gap {gap:.2e}")
    weights = official_names(model.state_dict())
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out / "weights.safetensors"))

    # reload the saved file strictly into a fresh reference model: the names are official
    model = loaders.get_mimi(None, mimi_config=cfg, num_codebooks=CONFIGS[args.config]["n_q"])
    model.load_state_dict(load_file(str(args.out / "weights.safetensors")), strict=True)
    model.eval()
    modules = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    assert any(".self_attn.in_projs.0.weight" in k for k in modules), "not the module layout"
    save_file(modules, str(args.out / "weights_modules.safetensors"))

    with torch.no_grad():
        codes = model.encode(audio)
        pcm = model.decode(codes)
        s_codes, s_pcm = [], []
        with model.streaming(args.batch):
            for i in range(frames):
                s_codes.append(model.encode(audio[:, :, i * frame : (i + 1) * frame]))
            for i in range(frames):
                s_pcm.append(model.decode(codes[:, :, i : i + 1]))
        s_codes = torch.cat(s_codes, -1)
        s_pcm = torch.cat(s_pcm, -1)

    golden = {
        "audio_int16": torch.round(audio * 32767).to(torch.int16).contiguous(),
        "codes": codes.contiguous(),
        "pcm": pcm.contiguous(),
        "stream_codes": s_codes.contiguous(),
    }
    save_file(golden, str(args.out / "golden.safetensors"))
    differ = (s_codes != codes).any(dim=1)  # (B, F)
    first_diff = [int(r.nonzero()[0]) if r.any() else None for r in differ]
    meta = {
        "config": args.config,
        "reference": "moshi 0.2.13 (PyPI)",
        "seed": args.seed,
        "weights_seed": args.seed + attempt,
        "min_relative_centroid_gap": gap,
        "batch": args.batch,
        "frames": frames,
        "num_codebooks": CONFIGS[args.config]["n_q"],
        "reference_streaming_first_frame_differing_from_offline": first_diff,
        "reference_streaming_vs_offline_pcm_max_abs": float((s_pcm - pcm).abs().max()),
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))
    print(
        "code spread per codebook:",
        [len(set(codes[:, k].flatten().tolist())) for k in range(codes.shape[1])],
    )


if __name__ == "__main__":
    main()
