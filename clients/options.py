"""Client options: session settings, TLS, auth, retries, and the channel they make.

Kept apart from the clients so the sync and asyncio clients build identical channels, configs
and metadata from one place.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from moshi_grpc.v1 import common_pb2, gateway_pb2

from .events import ENCODINGS, OGG_OPUS, PCM16

# Our own messages are small (one chunk of audio), but a client may send a long chunk at once.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Float32 voice audio above this goes at 24 kHz (Persona.to_proto): 30 s fit a message.
MAX_VOICE_FLOAT_BYTES = 3 * 1024 * 1024
# Trailing-metadata key in which the gateway may hint how long to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"

# How the gateway takes a session's input (SessionConfig.input_pacing).
REAL_TIME = "real_time"  # live audio: late frames are misses, overflow is dropped
FLOW_CONTROL = "flow_control"  # pre-recorded audio: the gateway reads only as fast as it serves
PACINGS = {
    REAL_TIME: gateway_pb2.INPUT_PACING_REAL_TIME,
    FLOW_CONTROL: gateway_pb2.INPUT_PACING_FLOW_CONTROL,
}


def pacing_for(realtime: bool) -> str:
    """The pacing of a whole file or array: paced at real time it is live audio, sent as fast
    as the gateway keeps up it is pre-recorded (nothing late because it came early)."""
    return REAL_TIME if realtime else FLOW_CONTROL


RETRYABLE_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


class ClientConfigError(ValueError):
    """An SDK option or session setting is invalid (caught before anything is sent)."""


class ConverseError(Exception):
    """A Converse session failed with a gRPC status.

    `code` and `details` are the status; `retry_after_ms` the gateway's hint if it sent one;
    `attempts` how many times the session start was tried; `started` whether the session had
    started (after that no retry is ever made: audio already went through the model).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        retry_after_ms: int | None = None,
        attempts: int = 1,
        started: bool = False,
    ) -> None:
        self.code = code
        self.details = details
        self.retry_after_ms = retry_after_ms
        self.attempts = attempts
        self.started = started
        super().__init__(f"{code.name}: {details} (attempts: {attempts})")


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel. All paths are PEM files; None uses the system roots.

    `client_cert` + `client_key` enable mutual TLS. `server_name` overrides the name checked
    against the server certificate (for tests and IP addresses).
    """

    root_ca: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ClientConfigError("TLS: client_cert and client_key must be given together")

        def read(p: str | Path | None) -> bytes | None:
            if p is None:
                return None
            try:
                return Path(p).read_bytes()
            except OSError as exc:
                raise ClientConfigError(f"TLS: cannot read {p}: {exc.strerror}") from exc

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_ca),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for the *start* of a session.

    Only RESOURCE_EXHAUSTED (overload: no free slot) and UNAVAILABLE (draining or failed
    backend) are retried, and only before the session started: once audio has gone through the
    model a retry would start the conversation over, which is the caller's decision, not the
    SDK's.
    A `retry-after-ms` hint from the gateway is honoured as the minimum wait.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ClientConfigError("retry: max_attempts must be >= 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ClientConfigError("retry: backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ClientConfigError("retry: jitter must be in [0, 1]")

    def delay_s(
        self, attempt: int, retry_after_ms: int | None = None, rng: random.Random | None = None
    ) -> float:
        """Wait before attempt `attempt + 1` (attempt counts from 1)."""
        rng = rng or random
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        # Jitter spreads clients that were refused together so they do not return together.
        delay = base * (1 - self.jitter * rng.random())
        if retry_after_ms is not None:
            hint = retry_after_ms / 1000.0
            delay = max(delay, hint * (1 + self.jitter * rng.random()))
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)


def retry_after_ms(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The gateway's `retry-after-ms` hint from trailing metadata, if present and valid."""
    for key, value in metadata or ():
        if key.lower() == RETRY_AFTER_KEY:
            try:
                ms = int(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
            return ms if ms >= 0 else None
    return None


@dataclass(frozen=True)
class Persona:
    """A voice and a role for the model, applied by the gateway before the session goes live
    (it needs a persona model behind it, e.g. NVIDIA PersonaPlex: `client.info().persona`).

    The voice is either a name the gateway serves (`voice_id`; `client.voices()` lists them)
    or a recording sent with the session (`voice_samples`, mono, at `voice_rate` Hz; at most
    the gateway's `--max-voice-s`, 30 s by default, and at least 0.4 s). `Persona.named`,
    `Persona.from_wav` and `Persona.from_voice` (a name or a WAV path, as the CLI's
    `--voice`) build one. The contract gives a persona a voice and a prompt, both required.
    """

    prompt: str
    voice_id: str | None = None
    voice_samples: np.ndarray | None = field(default=None, repr=False, compare=False)
    voice_rate: int = 24000

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ClientConfigError("persona: the prompt is empty; a persona needs a role prompt")
        if (self.voice_id is None) == (self.voice_samples is None):
            raise ClientConfigError(
                "persona: give exactly one voice, a voice_id or voice_samples (a persona has "
                "a voice and a prompt)"
            )
        if self.voice_id is not None and not self.voice_id:
            raise ClientConfigError("persona: voice_id is empty")
        if self.voice_samples is not None:
            x = np.asarray(self.voice_samples)
            if x.ndim != 1 or x.size == 0:
                raise ClientConfigError("persona: voice_samples must be a non-empty mono array")
            if not np.isfinite(x).all():
                raise ClientConfigError("persona: voice_samples has NaN or infinite samples")
            if not 8000 <= self.voice_rate <= 48000:
                raise ClientConfigError(
                    f"persona: voice_rate must be 8000..48000 Hz, got {self.voice_rate}"
                )

    @classmethod
    def named(cls, voice_id: str, prompt: str) -> Persona:
        """One of the gateway's voices (Gateway.Info)."""
        return cls(prompt, voice_id=voice_id)

    @classmethod
    def from_wav(cls, path: str | Path, prompt: str) -> Persona:
        """A WAV file's channel 0 as the voice (what PersonaPlex takes of a voice file).
        PersonaPlex's `.pt` voices are refused: they are not audio."""
        from moshi_grpc import audio

        path = Path(path)
        if path.suffix.lower() == ".pt":
            raise ClientConfigError(
                f"persona: {path} is a PersonaPlex .pt voice (precomputed embeddings of one "
                "checkpoint, not audio); the supported voice format is a WAV file"
            )
        try:
            samples, rate = audio.read_wav(path, channel=0)
        except OSError as exc:
            raise ClientConfigError(f"persona: cannot read {path}: {exc.strerror}") from None
        except audio.AudioFormatError as exc:
            raise ClientConfigError(f"persona: {exc} (the voice must be a WAV file)") from None
        return cls(prompt, voice_samples=samples, voice_rate=rate)

    @classmethod
    def from_voice(cls, voice: str | Path, prompt: str) -> Persona:
        """`voice` as the CLI's `--voice` takes it: a path ending in .wav (or .pt, refused),
        or an existing file, is a recording sent inline; anything else a voice_id."""
        path = Path(voice)
        if path.suffix.lower() in (".wav", ".pt") or path.is_file():
            return cls.from_wav(path, prompt)
        return cls.named(str(voice), prompt)

    def to_proto(self) -> gateway_pb2.Persona:
        """The wire message. A recording goes losslessly: as PCM16 when every sample is a
        16-bit value (a PCM16 file), else as float32; float32 audio too large for one
        message (the gateway takes 4 MiB by default) is first resampled to 24 kHz with the
        gateway's own resampler, which gives the samples the gateway would have made."""
        if self.voice_id is not None:
            return gateway_pb2.Persona(voice_id=self.voice_id, prompt=self.prompt)
        x = np.asarray(self.voice_samples, dtype=np.float32)
        rate = self.voice_rate
        scaled = x.astype(np.float64) * 32768.0
        if (
            np.array_equal(scaled, np.round(scaled))
            and -32768 <= scaled.min() <= scaled.max() < 32768
        ):
            data, encoding = scaled.astype("<i2").tobytes(), gateway_pb2.AUDIO_ENCODING_PCM16
        else:
            if x.nbytes > MAX_VOICE_FLOAT_BYTES and rate != 24000:
                from moshi_grpc import audio

                resampler = audio.StreamResampler(rate, audio.MODEL_RATE)
                x = np.concatenate([resampler.process(x), resampler.flush()])
                rate = audio.MODEL_RATE
            data, encoding = x.astype("<f4").tobytes(), gateway_pb2.AUDIO_ENCODING_FLOAT32
        voice = gateway_pb2.VoiceAudio(data=data, encoding=encoding, sample_rate=rate)
        return gateway_pb2.Persona(voice_audio=voice, prompt=self.prompt)


@dataclass(frozen=True)
class SessionOptions:
    """What the first message of a session (`SessionConfig`) says; None = server default."""

    sample_rate: int = 24000
    encoding: str = PCM16
    text_temperature: float | None = None
    text_top_k: int | None = None
    audio_temperature: float | None = None
    audio_top_k: int | None = None
    seed: int | None = None
    budget_ms: int | None = None
    max_consecutive_misses: int | None = None
    client_id: str = ""
    input_pacing: str | None = None  # REAL_TIME | FLOW_CONTROL; None = the gateway's (real time)
    # A voice and a role (needs a persona model behind the gateway). The SDK then sends no
    # audio before SessionStarted: the gateway applies the prompt first (seconds, maybe),
    # and live audio sent meanwhile would arrive late, all at once.
    persona: Persona | None = None

    def __post_init__(self) -> None:
        if not 8000 <= self.sample_rate <= 48000:
            raise ClientConfigError(f"sample_rate must be 8000..48000 Hz, got {self.sample_rate}")
        if self.encoding not in ENCODINGS:
            raise ClientConfigError(
                f"encoding must be one of {sorted(ENCODINGS)}, got {self.encoding!r}"
            )
        if self.encoding == OGG_OPUS:
            from moshi_grpc import audio

            try:
                audio.check_rate(OGG_OPUS, self.sample_rate)
            except audio.AudioFormatError as exc:
                raise ClientConfigError(str(exc)) from None
        for name in ("text_temperature", "audio_temperature"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ClientConfigError(f"{name} must be >= 0, got {v}")
        for name in ("text_top_k", "audio_top_k", "budget_ms", "max_consecutive_misses"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ClientConfigError(f"{name} must be >= 0, got {v}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ClientConfigError(f"seed must fit in 64 unsigned bits, got {self.seed}")
        if self.input_pacing is not None and self.input_pacing not in PACINGS:
            raise ClientConfigError(
                f"input_pacing must be one of {sorted(PACINGS)}, got {self.input_pacing!r}"
            )
        if self.persona is not None and not isinstance(self.persona, Persona):
            raise ClientConfigError("persona must be a Persona")

    def to_proto(self) -> gateway_pb2.ConverseRequest:
        sampling = common_pb2.SamplingParams()
        for name in ("text_temperature", "text_top_k", "audio_temperature", "audio_top_k"):
            v = getattr(self, name)
            if v is not None:
                setattr(sampling, name, v)
        config = gateway_pb2.SessionConfig(
            sample_rate=self.sample_rate,
            encoding=ENCODINGS[self.encoding],
            sampling=sampling,
            client_id=self.client_id,
        )
        if self.seed is not None:
            config.seed = self.seed
        if self.budget_ms is not None:
            config.budget_ms = self.budget_ms
        if self.max_consecutive_misses is not None:
            config.max_consecutive_misses = self.max_consecutive_misses
        if self.input_pacing is not None:
            config.input_pacing = PACINGS[self.input_pacing]
        if self.persona is not None:
            config.persona.CopyFrom(self.persona.to_proto())
        return gateway_pb2.ConverseRequest(config=config)


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach the gateway: address, TLS, bearer token, keepalive."""

    addr: str
    tls: TlsOptions | None = None
    token: str | None = None
    keepalive_s: float = 30.0
    extra: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    def grpc_options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            # The SDK retries session starts itself (with the pushback rules above); grpc's
            # transparent retries would double them.
            ("grpc.enable_retries", 0),
        ]
        if self.tls is not None and self.tls.server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name))
        opts.extend(self.extra)
        return opts

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token:
            return (("authorization", f"Bearer {self.token}"),)
        return ()

    def sync_channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.addr, options=self.grpc_options())
        return grpc.secure_channel(self.addr, self.tls.credentials(), options=self.grpc_options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.addr, options=self.grpc_options())
        return grpc.aio.secure_channel(
            self.addr, self.tls.credentials(), options=self.grpc_options()
        )
