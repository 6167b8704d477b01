"""Make the persona-session golden fixture with NVIDIA's PersonaPlex code (issue 22).

Run it with the PersonaPlex venv's python, from the repository root:

    PY=$(PERSONAPLEX_SRC=path/to/personaplex tools/persona-venv)   # makes .venv-persona
    NO_TORCH_COMPILE=1 $PY tools/make_persona_golden.py

It writes tests/fixtures/persona/:
- config.json: a small PersonaPlex-layout LM config in kyutai's config.json keys (real stream
  layout: text + 8 Moshi + 8 user audio streams, card 2048 so the real sine and silence codes
  are valid, dep_q 16; tiny widths, 2 layers; context 64, more than any session here uses);
- golden.json: the weights' tensor list and digest, the voice (Mimi codes), the live user
  codes, and for two text prompts with that same voice: the prompt token ids, per call of
  NVIDIA's `LMGen.step` what it was given, what the temporal transformer consumed, the argmax
  of the text logits it produced (prefix calls included, where the reference discards it), which
  of the 17 target tokens were forced, and the greedy text and Moshi audio tokens of the live
  calls; then the same sessions with the context cut to 48 and 40 live frames (`ring`), where
  the temporal ring KV cache wraps during the live calls: NVIDIA's full ring attends one key
  fewer than the context (docs/PERSONAPLEX.md), and its tokens differ from a context-wide
  window's from the live call recorded there on.

- loudness.json: NVIDIA's voice loudness normalisation (`normalize_audio`, -24 LUFS) on a few
  exactly reproducible signals (piecewise-linear waves: only IEEE-exact arithmetic, so any
  platform rebuilds the same samples with `loudness_signal`): the integrated loudness, the gain
  and a sha256 of the float32 samples the reference then frames for Mimi.

The weights are not committed (2.4 M parameters: the 2049-row audio embeddings alone are
megabytes). `persona_weights` rebuilds them bit for bit from the tensor list and the seed with
torch only; a test loads this file by path, calls it and checks `weights_digest` against
golden.json. NVIDIA's package is imported inside functions only, so that works from the
project's venv.

What runs is NVIDIA's own code, unmodified: `loaders.get_moshi_lm` (its small-model dict
swapped in, since the 7B one is hard-coded) loads the saved bf16 file in float32, and
`LMGen.step_system_prompts` + `LMGen.step` run the session exactly as `moshi/offline.py` and
`moshi/server.py` do. Only the codec is replaced: the voice is given as Mimi codes through a
stand-in whose `encode` returns them one frame per call (the codec is proven separately).
The trace wraps methods without changing what they return; the only altered run is the ring
contrast (`_window_wide_ring_complete`), which yields one recorded index and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "persona"
TOKENIZER = ROOT / "moshi_grpc" / "assets" / "tokenizer_small_4k.model"
PERSONAPLEX_COMMIT = "3428dfd95309a7f3c84fd93259ded0f810d1ff91"
SEED = 2207
VOICE_FRAMES = 5
LIVE_FRAMES = 16
RING_LIVE_FRAMES = 40
SAMPLE_RATE = 24000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples per Mimi frame at 24 kHz
RING_CONTEXT = 48  # the variant whose temporal ring wraps during its live calls
PROMPTS = (
    "You are a helpful assistant.",
    "You enjoy having a good conversation.",
)

CONFIG: dict[str, Any] = {
    "dim": 32,
    "text_card": 4000,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 16,
    "card": 2048,
    "num_heads": 2,
    "num_layers": 2,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 64,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 16,
    "depformer_dim_feedforward": 66,
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_causal": True,
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

# (name, [(samples, [(shape, period, amplitude), ...]), ...]): 24 kHz, summed waves per segment
LOUDNESS_SIGNALS: list[tuple[str, list[tuple[int, list[tuple[str, int, float]]]]]] = [
    ("minimum_0.4s", [(9600, [("triangle", 24, 0.3)])]),
    ("triangle_1s", [(24000, [("triangle", 32, 0.25)])]),
    ("odd_length_0.93s", [(22320, [("saw", 100, 0.1), ("triangle", 7, 0.05)])]),
    ("last_block_past_end_0.98s", [(23520, [("saw", 37, 0.2)])]),
    (
        "gated_3s",  # a quiet middle second that the relative gate drops
        [
            (24000, [("triangle", 55, 0.5)]),
            (24000, [("triangle", 55, 0.002)]),
            (24000, [("triangle", 8, 0.2)]),
        ],
    ),
]

_EMBEDDINGS = ("emb.", "text_emb.", "depformer_emb.", "depformer_text_emb.")


def persona_weights(tensors: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Rebuild the fixture's bf16 weights from (name -> shape) and the seed, torch only.

    Each tensor has its own generator seeded from (seed, name), so the values do not depend
    on the order or the set of other tensors: RMSNorm scales 1 + 0.2 N(0,1) (not all ones, so
    they are tested), embeddings N(0,1), every other weight N(0,1)/sqrt(fan_in). Stored in
    bfloat16 like the published checkpoints; the reference computes in float32.
    """
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        shape = list(tensors[name])
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
        w = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith(".alpha"):
            w = 1.0 + 0.2 * w
        elif not name.startswith(_EMBEDDINGS):
            w = w / shape[-1] ** 0.5
        out[name] = w.to(torch.bfloat16).contiguous()
    return out


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and raw bf16 bits, in name order (file-format free)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].to(torch.bfloat16).contiguous()
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _lm_kwargs() -> dict[str, Any]:
    return {k: v for k, v in CONFIG.items() if k != "moshi_name"}


def load_reference_lm(path: Path, context: int | None = None) -> torch.nn.Module:
    """NVIDIA's loader on the small config (it forces dep_q = 16 itself), float32 on CPU;
    `context` overrides the temporal transformer's context (not part of the weights).

    Its loader is not strict (strict=False, assign=True, missing 8..15 slices copied from
    0..7), so the names and shapes are checked here: every file tensor is a model tensor of
    the same shape and nothing is left on the meta device.
    """
    from moshi.models import loaders
    from safetensors.torch import load_file

    saved = loaders._lm_kwargs
    loaders._lm_kwargs = _lm_kwargs() | ({} if context is None else {"context": context})
    try:
        lm = loaders.get_moshi_lm(str(path), device="cpu", dtype=torch.float32)
    finally:
        loaders._lm_kwargs = saved
    file_state = load_file(str(path))
    model_state = lm.state_dict()
    if set(file_state) != set(model_state):
        raise SystemExit(f"names differ: {sorted(set(file_state) ^ set(model_state))}")
    for name, t in model_state.items():
        if t.is_meta or tuple(t.shape) != tuple(file_state[name].shape):
            raise SystemExit(f"tensor {name} not loaded as saved")
        if not torch.equal(t, file_state[name].float()):
            raise SystemExit(f"tensor {name} differs from the file")
    return lm


def eight_step_lm(full: torch.nn.Module, *, full_window: bool) -> torch.nn.Module:
    """The same weights with the depformer cut to Moshi's 8 steps (NVIDIA's LMModel, dep_q 8).

    Keeps steps 0..7 of every per-step tensor: the first 8 blocks of the stacked attention
    projections, gating/linears/depformer_in 0..7, depformer_emb 0..6 (the model's own names
    select them). Loaded strictly. NVIDIA's depformer KV ring holds dep_q entries and, once
    full, hides its oldest one (docs/PERSONAPLEX.md): with 8 slots step 7 would lose step 0,
    which the 16-step model never does for steps 0..7. full_window gives the cut model 16
    slots, so steps 0..7 attend to every earlier step as in the 16-step model.
    """
    from moshi.models.lm import LMModel
    from moshi.modules.transformer import set_attention_context

    cut = LMModel(**{**_lm_kwargs(), "dep_q": 8}).eval()
    full_state = full.state_dict()
    # per-step tensors are stacked on dim 0, steps in order: the first rows are steps 0..7
    state = {name: full_state[name][: t.shape[0]] for name, t in cut.state_dict().items()}
    cut.load_state_dict(state, strict=True)
    if full_window:
        set_attention_context(cut.depformer, CONFIG["dep_q"])
    return cut


def _window_wide_ring_complete(self: Any, k: torch.Tensor, v: torch.Tensor) -> Any:
    """NVIDIA's RingKVCache.complete with the slot just written as the newest position
    (kyutai moshi 0.2.x's rule): a full ring then attends `capacity` keys, not capacity - 1.
    Used only to show where the fixture's `ring` tokens depend on NVIDIA's rule."""
    from moshi.modules.transformer import KVCacheResult

    t = k.shape[2]
    slots = (torch.arange(t, dtype=torch.long) + self.end_offset) % self.capacity
    self.cache[0].index_copy_(2, slots, k)
    self.cache[1].index_copy_(2, slots, v)
    last = self.end_offset + t - 1
    self.end_offset.add_(t)
    indexes = torch.arange(self.capacity, dtype=torch.long)
    delta = indexes - last % self.capacity
    positions = torch.where(delta <= 0, last + delta, last + delta - self.capacity)
    positions = torch.where(indexes >= self.end_offset, torch.full_like(positions, -1), positions)
    return KVCacheResult(self.cache[0], self.cache[1], positions)


class CodesAsMimi(torch.nn.Module):
    """Stands in for Mimi in NVIDIA's voice-prompt path: each `encode` of one 1920-sample
    frame returns the next frame of the given codes, shaped [1, 8, 1] like Mimi's."""

    def __init__(self, codes: list[list[int]]) -> None:
        super().__init__()
        self._device_anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self._frames = [torch.tensor(c, dtype=torch.long).view(1, 8, 1) for c in codes]

    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        if pcm.shape[-1] != FRAME_SIZE:
            raise ValueError(f"expected one {FRAME_SIZE}-sample frame, got {tuple(pcm.shape)}")
        return self._frames.pop(0)


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(x) for x in t.reshape(-1)]


def _margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.reshape(-1).float(), 2).values
    return float(top[0] - top[1])


def run_session(
    lm: torch.nn.Module,
    prompt_ids: list[int],
    voice: list[list[int]],
    user: list[list[int]],
    *,
    warm_up: bool = True,
    sampling_seed: int | None = None,
) -> dict[str, Any]:
    """One prompted session through NVIDIA's LMGen, traced per `step` call.

    As its server does: streaming_forever(1), a warm-up (4 steps), reset_streaming(), then
    step_system_prompts (voice, silence, text, silence) and one step per live user frame.
    Greedy unless sampling_seed is given (then its defaults: temp 0.8/0.7, top-k 250/25).
    """
    from moshi.models.lm import LMGen

    calls: list[dict[str, Any]] = []
    current: dict[str, Any] = {}

    def traced_forward_codes(sequence: torch.Tensor) -> Any:
        current["input"] = _ints(sequence[0, :, 0])
        out = original_forward_codes(sequence)
        current["text_argmax"] = int(out[1].reshape(-1).argmax())
        current["margins"] = [_margin(out[1])]
        return out

    def traced_forward_depformer(cb_index: int, sequence: torch.Tensor, t_out: Any) -> Any:
        logits = original_forward_depformer(cb_index, sequence, t_out)
        current.setdefault("margins", []).append(_margin(logits))
        return logits

    original_forward_codes = lm.forward_codes
    original_forward_depformer = lm.forward_depformer
    lm.forward_codes = traced_forward_codes  # before streaming: LMGen captures it then
    lm.forward_depformer = traced_forward_depformer
    try:
        gen = LMGen(
            lm,
            device="cpu",
            use_sampling=sampling_seed is not None,
            audio_silence_frame_cnt=int(0.5 * FRAME_RATE),
            text_prompt_tokens=prompt_ids,
            sample_rate=SAMPLE_RATE,
            frame_rate=FRAME_RATE,
        )
        original_step = gen.step
        original_process = gen.process_transformer_output

        def traced_process(t_out, text_logits, provided_, target_, *rest):  # noqa: ANN001
            forced = [
                int(target_[0, k, 0]) if bool(provided_[0, k, 0]) else None
                for k in range(target_.shape[1])
            ]
            current["forced"] = forced
            return original_process(t_out, text_logits, provided_, target_, *rest)

        def traced_step(input_tokens=None, moshi_tokens=None, text_token=None, **kw):  # noqa: ANN001
            current.clear()
            out = original_step(input_tokens, moshi_tokens, text_token, **kw)
            calls.append(
                {
                    "given_text": None if text_token is None else int(text_token),
                    "given_agent": _ints(moshi_tokens),
                    "given_user": _ints(input_tokens),
                    "input": current.get("input"),
                    "text_argmax": current.get("text_argmax"),
                    "forced": current.get("forced"),
                    "margins": current.get("margins"),
                    "out": _ints(out[0, :, 0]) if out is not None else None,
                }
            )
            return out

        gen.step = traced_step
        gen.process_transformer_output = traced_process
        gen.streaming_forever(1)
        if warm_up:  # the server's warm-up: 4 steps before any session, then a reset
            for k in range(4):
                gen.step(torch.full((1, 8, 1), 7 * k + 1, dtype=torch.long))
            gen.reset_streaming()
            calls.clear()
        if sampling_seed is not None:
            torch.manual_seed(sampling_seed)
        gen.voice_prompt_audio = torch.zeros(1, len(voice) * FRAME_SIZE).numpy()
        gen.step_system_prompts(CodesAsMimi(voice))
        prefix_calls = len(calls)
        for frame in user:
            gen.step(torch.tensor(frame, dtype=torch.long).view(1, 8, 1))
    finally:
        lm.forward_codes = original_forward_codes
        lm.forward_depformer = original_forward_depformer
    return {"calls": calls, "prefix_calls": prefix_calls}


def live_tokens(session: dict[str, Any]) -> tuple[list[int | None], list[list[int] | None]]:
    """Text and Moshi's 8 audio tokens of each live call (None where step returned None)."""
    text: list[int | None] = []
    audio: list[list[int] | None] = []
    for call in session["calls"][session["prefix_calls"] :]:
        out = call["out"]
        text.append(None if out is None else out[0])
        audio.append(None if out is None else out[1:9])
    return text, audio


def _min_live_margin(session: dict[str, Any]) -> float:
    """Smallest top-1/top-2 logit gap over the tokens live calls sampled (not forced)."""
    gaps = []
    for call in session["calls"][session["prefix_calls"] :]:
        forced, margins = call["forced"], call["margins"]
        for k in range(9):  # text, then Moshi's 8 codebooks
            if forced[k] is None:
                gaps.append(margins[k])
    return min(gaps)


def loudness_signal(segments: list[tuple[int, list[tuple[str, int, float]]]]) -> np.ndarray:
    """A float32 test signal built with +, -, *, / and abs only (IEEE-exact everywhere):
    per segment, a sum of triangle (-1..1) or sawtooth (-1..1) waves of integer periods."""
    parts = []
    for samples, waves in segments:
        i = np.arange(samples, dtype=np.float64)
        x = np.zeros(samples, dtype=np.float64)
        for shape, period, amplitude in waves:
            phase = np.mod(i, period) / period
            wave = 4.0 * np.abs(phase - 0.5) - 1.0 if shape == "triangle" else 2.0 * phase - 1.0
            x = x + amplitude * wave
        parts.append(x)
    return np.concatenate(parts).astype(np.float32)


def loudness_cases() -> list[dict[str, Any]]:
    """NVIDIA's `normalize_audio` at 24 kHz (what `load_voice_prompt` applies after
    resampling) on each LOUDNESS_SIGNALS entry; the float32 rounding is the one its framing
    does (`torch.tensor(..., dtype=float32)`, lm.py:167)."""
    import pyloudnorm
    from moshi.models.lm import normalize_audio

    cases = []
    for name, segments in LOUDNESS_SIGNALS:
        x = loudness_signal(segments)
        lufs = float(pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(x))
        y = normalize_audio(x[None, :], SAMPLE_RATE, -24.0)
        framed = torch.tensor(y, dtype=torch.float32).numpy()
        gain = 10.0 ** ((-24.0 - lufs) / 20.0)
        if not np.array_equal(framed, (gain * x.astype(np.float64)).astype(np.float32)):
            raise SystemExit(f"{name}: normalize_audio is not gain * x")
        cases.append(
            {
                "name": name,
                "segments": segments,
                "integrated_lufs": lufs,
                "gain": gain,
                "normalized_float32_sha256": hashlib.sha256(framed.tobytes()).hexdigest(),
            }
        )
    return cases


def main() -> int:
    import sentencepiece
    from moshi.models import lm as pp_lm
    from moshi.models.lm import LMModel
    from moshi.modules.transformer import RingKVCache
    from moshi.offline import wrap_with_system_tags
    from safetensors.torch import save_file

    shapes = {
        name: list(t.shape)
        for name, t in LMModel(**_lm_kwargs(), device="meta").state_dict().items()
    }
    weights = persona_weights(shapes, SEED)
    digest = weights_digest(weights)
    g = torch.Generator().manual_seed(SEED + 1)
    card = CONFIG["card"]
    voice = torch.randint(0, card, (VOICE_FRAMES, 8), generator=g).tolist()
    user_all = torch.randint(0, card, (RING_LIVE_FRAMES, 8), generator=g).tolist()
    user = user_all[:LIVE_FRAMES]
    tokenizer = sentencepiece.SentencePieceProcessor(str(TOKENIZER))

    prompts = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "model.safetensors"
        save_file(weights, str(path))
        lm = load_reference_lm(path).eval()
        lm_ring = load_reference_lm(path, context=RING_CONTEXT).eval()
        lm8 = eight_step_lm(lm, full_window=True)
        lm8_nvidia_ring = eight_step_lm(lm, full_window=False)
        for prompt in PROMPTS:
            ids = tokenizer.encode(wrap_with_system_tags(prompt))
            s = run_session(lm, ids, voice, user)
            tokens = live_tokens(s)
            if live_tokens(run_session(lm, ids, voice, user, warm_up=False)) != tokens:
                raise SystemExit("the warm-up before reset_streaming changed the outputs")
            if live_tokens(run_session(lm8, ids, voice, user)) != tokens:
                raise SystemExit("an 8-step depformer changed Moshi's greedy outputs")
            ring = live_tokens(run_session(lm_ring, ids, voice, user_all))
            nvidia_complete = RingKVCache.complete
            RingKVCache.complete = _window_wide_ring_complete
            try:
                wide = live_tokens(run_session(lm_ring, ids, voice, user_all))
            finally:
                RingKVCache.complete = nvidia_complete
            wide_diff = [
                i
                for i in range(RING_LIVE_FRAMES)
                if (ring[0][i], ring[1][i]) != (wide[0][i], wide[1][i])
            ]
            if not wide_diff:
                raise SystemExit("the ring variant does not tell NVIDIA's ring rule apart")
            sampled16 = run_session(lm, ids, voice, user, sampling_seed=SEED)
            sampled8 = run_session(lm8, ids, voice, user, sampling_seed=SEED)
            prompts.append(
                {
                    "text_prompt": prompt,
                    "wrapped": wrap_with_system_tags(prompt),
                    "prompt_tokens": ids,
                    "prefix_calls": s["prefix_calls"],
                    "given_text": [c["given_text"] for c in s["calls"]],
                    "given_agent": [c["given_agent"] for c in s["calls"]],
                    "given_user": [c["given_user"] for c in s["calls"]],
                    "model_input": [c["input"] for c in s["calls"]],
                    "forced": [c["forced"] for c in s["calls"]],
                    "text_argmax": [c["text_argmax"] for c in s["calls"]],
                    "live_text": tokens[0],
                    "live_audio": tokens[1],
                    "min_live_margin": round(_min_live_margin(s), 4),
                    "ring": {
                        "live_text": ring[0],
                        "live_audio": ring[1],
                        "window_wide_first_differing_live_call": wide_diff[0],
                    },
                    "dep_q8_greedy_equal": True,
                    "dep_q8_nvidia_8_slot_ring_greedy_equal": (
                        live_tokens(run_session(lm8_nvidia_ring, ids, voice, user)) == tokens
                    ),
                    "dep_q8_sampled_equal": live_tokens(sampled16) == live_tokens(sampled8),
                }
            )

    if prompts[0]["live_text"] == prompts[1]["live_text"]:
        raise SystemExit("the two prompts gave the same live text tokens")
    golden: dict[str, Any] = {
        "reference": (
            f"NVIDIA/personaplex {PERSONAPLEX_COMMIT[:12]} (moshi/moshi), LMGen greedy, "
            "float32, CPU, batch 1, voice given as Mimi codes"
        ),
        "seed": SEED,
        "weights": {"dtype": "bfloat16", "sha256": digest, "tensors": shapes},
        "constants": {
            "text_pad": 3,
            "text_initial": CONFIG["text_card"],
            "audio_initial": card,
            "sine_tokens": [int(x) for x in pp_lm.SINE_TOKENS],
            "silence_tokens": [int(x) for x in pp_lm.SILENCE_TOKENS],
            "silence_frames": int(0.5 * FRAME_RATE),
        },
        "live_frames": LIVE_FRAMES,
        "ring": {"context": RING_CONTEXT, "live_frames": RING_LIVE_FRAMES},
        "voice_codes": voice,
        "user_codes": user_all,
        "prompts": prompts,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (OUT / "golden.json").write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    loudness = {
        "reference": "NVIDIA/personaplex moshi/models/lm.py normalize_audio (pyloudnorm), 24 kHz",
        "target_lufs": -24.0,
        "sample_rate": SAMPLE_RATE,
        "cases": loudness_cases(),
    }
    (OUT / "loudness.json").write_text(json.dumps(loudness, indent=1) + "\n")
    size = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({size} bytes); weights sha256 {digest}")
    for p in prompts:
        print(
            f"{p['text_prompt']!r}: {len(p['prompt_tokens'])} tokens, prefix "
            f"{p['prefix_calls']} calls, min margin {p['min_live_margin']}; ring: a context-"
            f"wide window differs from live call "
            f"{p['ring']['window_wide_first_differing_live_call']}; 8 steps on NVIDIA's "
            f"8-slot ring equal: {p['dep_q8_nvidia_8_slot_ring_greedy_equal']}; 8 steps "
            f"sampled equal: {p['dep_q8_sampled_equal']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
