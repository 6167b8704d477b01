"""Persona prompts: a voice and a role for a PersonaPlex session, started as its reference does.

NVIDIA PersonaPlex is a Moshi fine-tune whose sessions begin with prompts. Before the first
live frame its generator is fed, one frame per step (docs/PERSONAPLEX.md has the facts, with
references to NVIDIA/personaplex):

1. the voice: each of its Mimi frames as the model's *own* audio, text PAD, the user's
   stream a fixed sine (`SINE_TOKENS`);
2. half a second of silence (6 frames: `SILENCE_TOKENS` as Moshi's audio, PAD, sine);
3. the role prompt, `"<system> {prompt} <system>"`, one token per frame (Moshi silent,
   user sine);
4. half a second of silence again.

Every token of those frames is given, so nothing needs sampling and no depformer step: the
reference's outputs during the prompt are discarded. `persona_plan` turns the frames into a
teacher-forced `Prefix` (lm_gen.py) that a batched prefill puts into a row: the columns its
steps read (the reference's rules for the first frames included: its frame 0 never reaches
the model), the token ring after them, the delayed codebooks of the last frame that the
first live step must keep, and the sine the first live step takes as the user's codes
(PersonaPlex's generator feeds each step the user's codes of the step before).

The state after a prompt depends on (model, voice codes, prompt tokens) only, and the state
after the voice and its silence on (model, voice codes) only (`voice_steps`): what a prefix
cache keys on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moshi_grpc.models.lm_gen import Prefix, StreamLayout

__all__ = [
    "SILENCE_FRAMES",
    "SILENCE_TOKENS",
    "SINE_TOKENS",
    "PersonaError",
    "PersonaPlan",
    "check_prompt_fits",
    "persona_plan",
    "prompt_frames",
    "prompt_length",
    "wrap_prompt",
]

# Moshi's 8 codes of a silent frame and the user's 8 codes during a prompt (a 440 Hz sine):
# constants of the reference (its lm.py), not encoded at run time.
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
SILENCE_FRAMES = 6  # int(0.5 s * 12.5 Hz), after the voice and after the text


class PersonaError(ValueError):
    """A persona the model cannot take: no voice, an empty prompt, codes out of range, or
    a prompt longer than the model's context."""


def wrap_prompt(text: str) -> str:
    """The role prompt as the model was trained on it: `<system> ... <system>`, unless the
    caller already wrapped it."""
    cleaned = text.strip()
    if cleaned.startswith("<system>") and cleaned.endswith("<system>"):
        return cleaned
    return f"<system> {cleaned} <system>"


@dataclass(frozen=True)
class PersonaPlan:
    """A prompt's prefix (`prefix.steps` = frames - 1 steps), how many prompt frames it
    has, and how many of its steps depend on the voice alone."""

    prefix: Prefix
    frames: int
    voice_steps: int


def prompt_length(voice_frames: int, text_tokens: int) -> int:
    """Frames of a prompt: the voice, its silence, one per text token, silence again."""
    return voice_frames + 2 * SILENCE_FRAMES + text_tokens


def check_prompt_fits(voice_frames: int, text_tokens: int, context: int) -> int:
    """The prompt's frames; PersonaError when they do not fit a model of `context` steps
    (the live session needs at least one position after them)."""
    frames = prompt_length(voice_frames, text_tokens)
    if frames >= context:
        raise PersonaError(
            f"the persona's prompt takes {frames} frames ({voice_frames} of voice, "
            f"{text_tokens} text tokens, {2 * SILENCE_FRAMES} of silence); the model's "
            f"context is {context} steps: shorten the voice or the prompt"
        )
    return frames


def prompt_frames(
    voice: torch.Tensor, tokens: list[int], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt's frames: text `[F]`, Moshi's codes `[F, 8]`, the user's `[F, 8]`."""
    v, n = int(voice.shape[0]), len(tokens)
    f = prompt_length(v, n)
    silence = torch.tensor(SILENCE_TOKENS, dtype=torch.long)
    text = torch.full((f,), pad, dtype=torch.long)
    text[v + SILENCE_FRAMES : v + SILENCE_FRAMES + n] = torch.tensor(tokens, dtype=torch.long)
    moshi = silence.repeat(f, 1)
    moshi[:v] = voice
    user = torch.tensor(SINE_TOKENS, dtype=torch.long).repeat(f, 1)
    return text, moshi, user


def persona_plan(
    layout: StreamLayout,
    initial: torch.Tensor,
    ring: torch.Tensor,
    voice: torch.Tensor,
    tokens: list[int],
    pad: int,
    card: int,
    context: int,
) -> PersonaPlan:
    """The teacher-forced prefix of a session with voice codes `voice [V, 8]` and prompt
    tokens `tokens`, for a model with this stream layout, initial tokens `initial [K]`, a
    fresh token ring `ring [K, R]`, padding id `pad`, `card` codes per codebook and
    `context` steps; PersonaError when the model cannot take it.

    The reference runs the model on frame t at step t, where frame t's undelayed tokens
    meet frame t - 1's delayed ones; in the step core's terms, step t's "sampled" tokens
    are frame t + 1's text and codebook 0 and frame t's delayed codebooks, and its user
    codes frame t's. The prefix runs steps 0 .. F - 2; the first live step (F - 1) must
    keep frame F - 1's delayed codebooks (`pending`) and take its user codes (the sine)."""
    if voice.dim() != 2 or voice.shape[0] < 1 or voice.shape[1] != layout.dep_q:
        raise PersonaError(
            f"the voice must be at least one frame of {layout.dep_q} codes, got {list(voice.shape)}"
        )
    if int(voice.min()) < 0 or int(voice.max()) >= card:
        raise PersonaError(f"voice codes must be in [0, {card})")
    if not tokens:
        raise PersonaError("the persona's text prompt is empty")
    if max(SILENCE_TOKENS + SINE_TOKENS) >= card:
        raise PersonaError(
            f"the model's codebooks hold {card} codes: too few for PersonaPlex's silence and "
            "sine frames (its codebooks hold 2048)"
        )
    frames = check_prompt_fits(int(voice.shape[0]), len(tokens), context)
    text, moshi, user = prompt_frames(voice.to("cpu", torch.long), tokens, pad)
    steps = frames - 1
    sampled = torch.cat([text[1:, None], moshi[1:, :1], moshi[:-1, 1:]], dim=1)  # [F - 1, G]
    columns, ring = layout.simulate(ring, 0, user[:steps], sampled, initial)
    g = layout.generated
    pending = torch.zeros(g, dtype=torch.bool)
    pending_tokens = torch.zeros(g, dtype=torch.long)
    for stream in range(1, g):  # Moshi's codebooks whose delay reaches into the next frame
        if layout.delays[stream] > 0:
            pending[stream] = True
            pending_tokens[stream] = moshi[-1, stream - 1]
    prefix = Prefix(columns, ring, pending, pending_tokens, user_prev=user[-1].clone())
    voice_steps = int(voice.shape[0]) + SILENCE_FRAMES - 1
    return PersonaPlan(prefix=prefix, frames=frames, voice_steps=voice_steps)
