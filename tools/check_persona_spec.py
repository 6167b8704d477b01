"""Re-derive the persona golden tokens from docs/PERSONAPLEX.md's rules, without NVIDIA's code.

Run it with the reference venv's python (kyutai moshi 0.2.13), from the repository root:

    NO_TORCH_COMPILE=1 $(../shared/tools/reference-venv) tools/check_persona_spec.py

It rebuilds the fixture's weights (tools/make_persona_golden.py's recipe), loads them into
kyutai's `LMModel` (dep_q 16 as in the file), builds the prefix positions by the doc's table,
runs positions 0..F-2 through the temporal transformer as one chunk, then steps the live
frames greedily with depformer steps 0..7 only: the user stream one frame late (the sine frame
first), Moshi's codebooks 1..7 forced to the silence codes at the first live step. It prints,
per prompt, whether the live tokens equal the golden ones: the main sessions must be equal;
the `ring` sessions (context 48) must first differ at the recorded call, since kyutai's ring
KV cache attends `context` keys where NVIDIA's attends one fewer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "persona"


def _recipe() -> Any:
    spec = importlib.util.spec_from_file_location(
        "persona_recipe", ROOT / "tools" / "make_persona_golden.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prefix_frames(golden: dict[str, Any], prompt_tokens: list[int]) -> list[tuple]:
    """(text, moshi[8], user[8]) per prefix frame: voice, silence, text, silence."""
    c = golden["constants"]
    pad, sil, sine = c["text_pad"], c["silence_tokens"], c["sine_tokens"]
    frames = [(pad, v, sine) for v in golden["voice_codes"]]
    frames += [(pad, sil, sine)] * c["silence_frames"]
    frames += [(t, sil, sine) for t in prompt_tokens]
    frames += [(pad, sil, sine)] * c["silence_frames"]
    return frames


def position(golden: dict[str, Any], delays: list[int], frames: list[tuple], p: int) -> list[int]:
    """The 17 tokens of prefix position p: position 0 all initial; undelayed streams from
    frame p, delayed ones from frame p-1 (initial at p = 1)."""
    c = golden["constants"]
    if p == 0:
        return [c["text_initial"]] + [c["audio_initial"]] * 16
    row = [frames[p][0]]
    for k in range(16):
        side = 1 if k < 8 else 2
        if delays[1 + k] == 0:
            row.append(frames[p][side][k % 8])
        else:
            row.append(c["audio_initial"] if p == 1 else frames[p - 1][side][k % 8])
    return row


def live_session(lm: Any, golden: dict[str, Any], prompt: dict[str, Any], frames_n: int) -> tuple:
    """Greedy live tokens of one prompted session, by the doc's rules."""
    c = golden["constants"]
    delays = json.loads((FIXTURE / "config.json").read_text())["delays"]
    frames = prefix_frames(golden, prompt["prompt_tokens"])
    f = len(frames)
    if f != prompt["prefix_calls"]:
        raise SystemExit(f"prefix length {f} != golden {prompt['prefix_calls']}")
    xs = [position(golden, delays, frames, p) for p in range(f)]
    if xs[: f - 1] != prompt["model_input"][1:f]:
        raise SystemExit("prefix positions differ from the golden model inputs")
    texts: list[int] = []
    audios: list[list[int]] = []
    with lm.streaming(1):
        _, prefix_logits = lm.forward_text(torch.tensor(xs[: f - 1]).T[None])  # one chunk
        # [1, 1, F-1, text_card]: the text argmax of every prefix position, as recorded
        if prefix_logits[0, 0].argmax(-1).tolist() != prompt["text_argmax"][1:f]:
            raise SystemExit("prefill text logits differ from the golden ones")
        prev_user, x_prev = c["sine_tokens"], xs[f - 1]
        for i, user in enumerate(golden["user_codes"][:frames_n]):
            t_out, text_logits = lm.forward_text(torch.tensor(x_prev).view(1, 17, 1))
            token = int(text_logits[0, 0, 0].argmax())
            text, moshi = token, []
            with lm.depformer.streaming(1):
                for k in range(8):  # Moshi's codebooks only: steps 8..15 dropped
                    logits = lm.forward_depformer(k, torch.tensor([[[token]]]), t_out)
                    token = int(logits[0, 0, 0].argmax())
                    if i == 0 and k >= 1:  # boundary: delayed codebooks still forced
                        token = c["silence_tokens"][k]
                    moshi.append(token)
            texts.append(x_prev[0])
            audios.append([x_prev[1]] + moshi[1:])
            x_prev = [text] + moshi + [user[0]] + prev_user[1:]
            prev_user = user
    return texts, audios


def main() -> int:
    from moshi.models.loaders import get_moshi_lm

    recipe = _recipe()
    golden = json.loads((FIXTURE / "golden.json").read_text())
    weights = recipe.persona_weights(golden["weights"]["tensors"], golden["seed"])
    if recipe.weights_digest(weights) != golden["weights"]["sha256"]:
        raise SystemExit("rebuilt weights differ from the fixture's digest")
    config = {k: v for k, v in json.loads((FIXTURE / "config.json").read_text()).items()}
    config.pop("moshi_name")
    ok = True
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "model.safetensors"
        save_file(weights, str(path))
        for variant in ("main", "ring"):
            kwargs = dict(config)
            if variant == "ring":
                kwargs["context"] = golden["ring"]["context"]
            lm = get_moshi_lm(str(path), lm_kwargs=kwargs, device="cpu", dtype=torch.float32)
            lm.eval()
            for prompt in golden["prompts"]:
                ref = prompt if variant == "main" else prompt["ring"]
                n = golden["live_frames"] if variant == "main" else golden["ring"]["live_frames"]
                texts, audios = live_session(lm, golden, prompt, n)
                diff = [
                    i
                    for i in range(n)
                    if (texts[i], audios[i]) != (ref["live_text"][i], ref["live_audio"][i])
                ]
                expected = (
                    None if variant == "main" else ref["window_wide_first_differing_live_call"]
                )
                first = diff[0] if diff else None
                ok &= first == expected
                print(
                    f"{variant} {prompt['text_prompt']!r}: first differing live call {first} (expected {expected})"
                )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
