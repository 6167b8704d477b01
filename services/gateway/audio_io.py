"""A session's audio both ways: the client's bytes in its encoding and rate <-> the model's
24 kHz frames of 1920 samples (stateful: resamplers, the reframer, Ogg Opus streams)."""

from __future__ import annotations

import numpy as np

from moshi_grpc import audio
from moshi_grpc.services.common.errors import InvalidInput
from moshi_grpc.services.gateway.config import SessionParams


class SessionAudio:
    """Client audio -> model frames (`frames`, `last_frames`); model frames -> client
    audio (`encode`). One per session: every stage of the conversion keeps state."""

    def __init__(self, params: SessionParams, quality: str) -> None:
        rate = params.sample_rate
        self._in = audio.StreamResampler(rate, audio.MODEL_RATE, quality)
        self._reframer = audio.Reframer(audio.FRAME_SIZE)
        self._out = audio.FrameResampler(rate, quality)
        self._decoder = audio.StreamDecoder(params.encoding, rate)
        self._encoder = audio.StreamEncoder(params.encoding, rate)
        self._silence = np.zeros(audio.FRAME_SIZE, np.float32)

    def frames(self, data: bytes) -> list[np.ndarray]:
        """The model frames that a client chunk completes (bytes that do not decode:
        InvalidInput)."""
        try:
            samples = self._decoder.decode(data)
        except audio.AudioFormatError as exc:
            raise InvalidInput(str(exc)) from None
        return self._reframer.push(self._in.process(samples))

    def last_frames(self) -> list[np.ndarray]:
        """The client's input ended: what the resampler held back, the last partial frame
        padded."""
        frames = self._reframer.push(self._in.flush())
        last = self._reframer.flush()
        if last is not None:
            frames.append(last)
        return frames

    def encode(self, pcm: np.ndarray | None) -> bytes:
        """One model frame (None: silence) as the next bytes of the client's reply audio."""
        return self._encoder.encode(self._out.process(self._silence if pcm is None else pcm))
