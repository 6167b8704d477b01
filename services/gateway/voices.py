"""Voices of persona sessions: the operator's voice directory, inline voices, and their codes.

A voice prompt reaches the LM as Mimi codes of the voice as PersonaPlex prepares it
(docs/PERSONAPLEX.md §3): mono (a file's channel 0), resampled to 24 kHz (the project's
resampler, `audio.StreamResampler`), loudness-normalised to -24 LUFS (`moshi_grpc.loudness`),
cut into 1920-sample frames (the last one zero-padded), each encoded by Mimi from a fresh
streaming state.

- Named voices: `--voice-dir DIR` holds WAV files, each a voice named by its file's stem.
  They are read, checked and prepared once, at start; their codes are made on first use
  through the session's leased codec replica and kept (per codec model: replicas that serve
  another Mimi give other codes). PersonaPlex's bundled `.pt` voices are not codes (summed
  input embeddings of one checkpoint plus a token ring, docs/PERSONAPLEX.md §9): they are
  refused with a warning at start, and by name with INVALID_ARGUMENT.
- Inline voices (`Persona.voice_audio`): decoded in the session's terms (any accepted
  encoding and rate), checked against `--max-voice-s`, prepared and encoded per session.

Every bad voice gets a clear status before any backend is touched: silent, shorter than
one loudness block (0.4 s), longer than the limit, undecodable, not finite.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from moshi_grpc import audio, loudness
from moshi_grpc.services.common.errors import BackendUnavailable, InvalidInput, NotFound
from moshi_grpc.services.gateway.ending import StageStalled
from moshi_grpc.services.gateway.streams import PER_SESSION, backend_error, open_stream
from moshi_grpc.v1 import codec_pb2, gateway_pb2

log = logging.getLogger(__name__)

WAV_SUFFIX = ".wav"
TORCH_SUFFIX = ".pt"
# What `.pt` voices are, for the messages that refuse them.
PT_REFUSAL = (
    "is a PersonaPlex .pt voice (precomputed input embeddings of one checkpoint, not Mimi "
    "codes: it cannot be converted); the supported voice format is a WAV file (mono, any "
    "sample rate, at least 0.4 s of speech)"
)


def voice_frames(samples: np.ndarray, rate: int, what: str, max_s: float) -> np.ndarray:
    """A voice as the frames Mimi encodes: (frames, 1920) float32 at 24 kHz, at -24 LUFS.
    InvalidInput (naming `what`) when it is longer than `max_s`, not finite, shorter than
    one loudness block or silent."""
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    duration_s = x.size / rate
    if duration_s > max_s:
        raise InvalidInput(
            f"{what} is {duration_s:.2f} s long; the gateway takes voices of at most "
            f"{max_s:g} s (--max-voice-s)"
        )
    if not np.isfinite(x).all():
        raise InvalidInput(f"{what} has NaN or infinite samples")
    resampler = audio.StreamResampler(rate, audio.MODEL_RATE)
    x = np.concatenate([resampler.process(x), resampler.flush()])
    try:
        normalized, _, _ = loudness.normalize(x, audio.MODEL_RATE)
    except loudness.LoudnessError as exc:
        raise InvalidInput(f"{what} is {exc}") from None
    frames = -(-normalized.size // audio.FRAME_SIZE)
    padded = np.zeros(frames * audio.FRAME_SIZE, np.float32)
    padded[: normalized.size] = normalized
    return padded.reshape(frames, audio.FRAME_SIZE)


def decode_voice(voice: gateway_pb2.VoiceAudio) -> tuple[np.ndarray, int]:
    """Inline voice bytes -> (mono float32 samples, rate); InvalidInput when they do not
    decode in their encoding."""
    from moshi_grpc.services.gateway.config import ENCODING_NAMES

    encoding = ENCODING_NAMES.get(voice.encoding)
    if encoding is None:
        names = ", ".join(gateway_pb2.AudioEncoding.Name(e) for e in ENCODING_NAMES)
        raise InvalidInput(f"persona.voice_audio.encoding must be one of {names}")
    if not voice.data:
        raise InvalidInput("persona.voice_audio.data is empty")
    try:
        audio.check_rate(encoding, voice.sample_rate)
        samples = audio.StreamDecoder(encoding, voice.sample_rate).decode(voice.data)
    except audio.AudioFormatError as exc:
        raise InvalidInput(f"persona.voice_audio does not decode: {exc}") from None
    if samples.size == 0:
        raise InvalidInput("persona.voice_audio decodes to no samples")
    return samples, voice.sample_rate


@dataclass
class Voice:
    """A voice ready for Mimi: its frames, and how the session names it ("" when inline)."""

    frames: np.ndarray  # (n, 1920) float32, 24 kHz, -24 LUFS
    duration_s: float  # of the recording as given
    name: str = ""

    @property
    def named(self) -> bool:
        return bool(self.name)

    async def codes(self, encode: Callable[[np.ndarray], Awaitable[list[int]]], model: str):
        """(the voice's codes, whether they were encoded now): an inline voice is encoded
        every time, a named one once per codec `model` (see NamedVoice)."""
        return await encode(self.frames), True


@dataclass
class NamedVoice(Voice):
    """A voice of the directory: its codes are made once per codec model and kept. Sessions
    that start together while they are being made wait for the same encode."""

    kept: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, repr=False)

    async def codes(self, encode: Callable[[np.ndarray], Awaitable[list[int]]], model: str):
        if model in self.kept:
            return self.kept[model], False
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            if model in self.kept:
                return self.kept[model], False
            codes = await encode(self.frames)  # a failure leaves nothing kept: retried next
            self.kept[model] = codes
            return codes, True

    def info(self) -> gateway_pb2.VoiceInfo:
        return gateway_pb2.VoiceInfo(
            voice_id=self.name, duration_s=self.duration_s, frames=len(self.frames)
        )


class VoiceDirectory:
    """The named voices (`--voice-dir`), read and prepared at start."""

    def __init__(self, voices: Iterable[NamedVoice] = (), refused: dict[str, str] | None = None):
        self.voices = {v.name: v for v in voices}
        self.refused = dict(refused or {})  # name -> why (the .pt voices)
        self.path: Path | None = None

    @classmethod
    def load(cls, path: str | Path | None, max_s: float) -> VoiceDirectory:
        """Every WAV file of `path` as a voice named by its stem. A `.pt` voice is refused
        with a warning; a WAV file that is not a usable voice stops the start (the operator
        put it there to be served). None: no named voices."""
        if path is None:
            return cls()
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"--voice-dir {root}: not a directory")
        voices, refused = [], {}
        for file in sorted(root.iterdir()):
            suffix = file.suffix.lower()
            if suffix == TORCH_SUFFIX:
                refused[file.stem] = f"voice {file.stem!r} ({file.name}) {PT_REFUSAL}"
                log.warning("voice directory: %s %s; not served", file.name, PT_REFUSAL)
            elif suffix == WAV_SUFFIX:
                if file.stem in refused or any(v.name == file.stem for v in voices):
                    raise ValueError(f"--voice-dir {root}: two voices named {file.stem!r}")
                voices.append(read_voice(file, max_s))
            elif file.is_file():
                log.warning("voice directory: %s is not a WAV file; ignored", file.name)
        directory = cls(voices, refused)
        directory.path = root
        log.info(
            "voice directory %s: %d voice(s) (%s)",
            root,
            len(voices),
            ", ".join(f"{v.name} {v.duration_s:.1f} s" for v in voices) or "none",
        )
        return directory

    def get(self, name: str) -> NamedVoice:
        """The voice named `name`: NotFound naming the voices there are, InvalidInput for a
        refused `.pt` voice."""
        voice = self.voices.get(name)
        if voice is not None:
            return voice
        if name in self.refused:
            raise InvalidInput(self.refused[name])
        known = ", ".join(sorted(self.voices)) or "none (the gateway has no --voice-dir)"
        raise NotFound(f"unknown voice_id {name!r}; the gateway's voices: {known}")

    def info(self) -> list[gateway_pb2.VoiceInfo]:
        return [self.voices[name].info() for name in sorted(self.voices)]


def read_voice(path: Path, max_s: float) -> NamedVoice:
    """A WAV file as a named voice (channel 0, as the reference takes); ValueError naming the
    file when it is not a usable voice."""
    try:
        samples, rate = audio.read_wav(path, channel=0)
        if not audio.MIN_RATE <= rate <= audio.MAX_RATE:
            raise InvalidInput(
                f"its sample rate {rate} Hz is outside {audio.MIN_RATE}..{audio.MAX_RATE} Hz"
            )
        frames = voice_frames(samples, rate, "the voice", max_s)
    except ValueError as exc:
        raise ValueError(f"voice file {path}: {exc}") from None
    return NamedVoice(frames=frames, duration_s=samples.size / rate, name=path.stem)


async def encode_on(
    replica: Any,
    stage: Any,
    frames: np.ndarray,
    *,
    metadata: tuple[tuple[str, str], ...],
    session_id: str,
    retry_ms: int,
    answer_timeout_s: float,
) -> list[int]:
    """Mimi codes of `frames` (flat, frame after frame) from a fresh Encode stream on the
    codec `replica` (`stage`: the pipeline's encode stage): fresh streaming state, as the
    reference encodes a voice. The codec steps one frame of a stream per tick, so this
    takes about `len(frames)` ticks. A refusal or failure raises what the session gets;
    a codec that leaves a frame unanswered for `answer_timeout_s` ends it (StageStalled)."""
    stream = open_stream(replica, stage, metadata, PER_SESSION)
    what = f"{replica.kind} replica {replica.address} (voice encode)"

    async def send() -> None:
        await stream.open(codec_pb2.CodecOpen(session_id=f"{session_id}-voice"))
        for i, frame in enumerate(frames):
            await stream.send(stage.request(i, frame))
        await stream.done_writing()

    sender = asyncio.get_running_loop().create_task(send(), name=f"voice-encode:{session_id}")
    codes: list[int] = []
    try:
        for i in range(len(frames)):
            try:
                answer = await asyncio.wait_for(stream.read(), answer_timeout_s)
            except asyncio.TimeoutError:
                raise StageStalled(
                    f"{what} did not answer frame {i} of {len(frames)} within "
                    f"{answer_timeout_s:g} s (--open-answer-timeout-s)"
                ) from None
            if answer is grpc.aio.EOF:
                raise BackendUnavailable(f"{what} ended the stream after {i} of {len(frames)}")
            codes.extend(answer.codes)
        await sender
    except grpc.aio.AioRpcError as exc:
        raise backend_error(replica, "voice encode", exc, retry_ms) from None
    finally:
        if not sender.done():
            sender.cancel()
        elif not sender.cancelled() and sender.exception() is not None:
            log.debug("voice encode: sending failed too: %r", sender.exception())
        stream.close()
    per_frame = len(codes) // max(1, len(frames))
    if per_frame * len(frames) != len(codes) or per_frame == 0:
        raise BackendUnavailable(f"{what} returned {len(codes)} codes for {len(frames)} frames")
    return codes
