"""Audio utilities shared by the gateway and the client SDK.

Everything here works on mono float32 numpy arrays. The pieces:

- wav files: `read_wav` / `write_wav` (PCM16, PCM24, PCM32 and IEEE float; multi-channel files
  are averaged to mono), written without the `wave` module because it cannot read float wavs.
- sample encodings: `decode_samples` / `encode_samples` between raw little-endian bytes
  (PCM16 or float32) and float32 arrays, with clear `AudioFormatError`s for odd byte counts,
  empty chunks and NaN/Inf.
- `StreamResampler`: a stateful band-limited resampler (soxr) for audio arriving in chunks of
  any size; chunk edges leave no artifacts because the filter state carries over.
- `Reframer`: cuts a stream of samples into fixed frames (1920 samples = 80 ms at 24 kHz).
- `FrameResampler`: turns fixed 24 kHz frames into chunks of *exactly* the right length at
  another rate, frame by frame, so output frame t always has its nominal duration.
- `speech_like`: a deterministic synthetic voice-like test signal (pitch contour, formants,
  syllables and pauses) for demos and tests.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np
import soxr

MODEL_RATE = 24000
FRAME_SIZE = 1920
MIN_RATE = 8000
MAX_RATE = 48000

PCM16 = "pcm16"
FLOAT32 = "float32"
ENCODINGS = (PCM16, FLOAT32)

_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_IEEE_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


class AudioFormatError(ValueError):
    """Audio bytes or files that cannot be interpreted (bad size, encoding, NaN, header)."""


# --------------------------------------------------------------------------- encodings


def bytes_per_sample(encoding: str) -> int:
    if encoding == PCM16:
        return 2
    if encoding == FLOAT32:
        return 4
    raise AudioFormatError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def decode_samples(data: bytes, encoding: str, *, allow_empty: bool = False) -> np.ndarray:
    """Raw little-endian mono samples -> float32 array in [-1, 1] (float32 input unclipped).

    Rejects what a streaming service must never pass on: byte counts that are not a whole
    number of samples, empty chunks (unless allowed) and non-finite floats.
    """
    width = bytes_per_sample(encoding)
    if len(data) % width:
        raise AudioFormatError(
            f"{encoding} audio chunk of {len(data)} bytes is not a whole number of "
            f"{width}-byte samples"
        )
    if not data and not allow_empty:
        raise AudioFormatError("empty audio chunk")
    if encoding == PCM16:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) * np.float32(1.0 / 32768.0)
    samples = np.frombuffer(data, dtype="<f4").astype(np.float32, copy=True)
    if samples.size and not np.isfinite(samples).all():
        raise AudioFormatError("float32 audio chunk contains NaN or Inf samples")
    return samples


def encode_samples(samples: np.ndarray, encoding: str) -> bytes:
    """float32 array -> raw little-endian bytes; PCM16 clips to [-1, 1] and rounds."""
    if encoding == PCM16:
        scaled = np.clip(samples, -1.0, 1.0) * 32767.0
        return np.rint(scaled).astype("<i2").tobytes()
    if encoding == FLOAT32:
        return np.asarray(samples, dtype="<f4").tobytes()
    raise AudioFormatError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def f32le_to_array(data: bytes) -> np.ndarray:
    """Backend wire format (float32 LE) -> float32 array (a read-only view, no copy)."""
    return np.frombuffer(data, dtype="<f4")


def array_to_f32le(samples: np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<f4").tobytes()


def frame_samples_at(rate: int, frame_index: int) -> int:
    """Samples of 24 kHz frame `frame_index` once resampled to `rate` (exact, integer).

    Frames at rates that do not divide evenly (e.g. 44.1 kHz: 3528 per frame is exact, but
    11025 Hz gives 882, and 12345 Hz gives 987.6) alternate lengths so that the cumulative
    count after frame t is always floor((t + 1) * 1920 * rate / 24000).
    """
    return _cumulative(rate, frame_index + 1) - _cumulative(rate, frame_index)


def _cumulative(rate: int, frames: int) -> int:
    return (frames * FRAME_SIZE * rate) // MODEL_RATE


# --------------------------------------------------------------------------- wav files


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a wav file -> (mono float32 samples, sample rate)."""
    raw = Path(path).read_bytes()
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise AudioFormatError(f"{path}: not a RIFF/WAVE file")
    pos = 12
    fmt = None
    data = None
    while pos + 8 <= len(raw):
        chunk_id, size = struct.unpack_from("<4sI", raw, pos)
        body = raw[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            fmt = body
        elif chunk_id == b"data":
            data = body
        pos += 8 + size + (size & 1)
    if fmt is None or data is None or len(fmt) < 16:
        raise AudioFormatError(f"{path}: missing fmt or data chunk")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels < 1 or block_align < 1:
        raise AudioFormatError(f"{path}: bad channel count or block alignment")
    usable = len(data) - len(data) % block_align
    data = data[:usable]
    if tag == _WAVE_FORMAT_PCM and bits == 16:
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    elif tag == _WAVE_FORMAT_PCM and bits == 24:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif tag == _WAVE_FORMAT_PCM and bits == 32:
        x = (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2**31).astype(np.float32)
    elif tag == _WAVE_FORMAT_IEEE_FLOAT and bits == 32:
        x = np.frombuffer(data, dtype="<f4").astype(np.float32)
    else:
        raise AudioFormatError(f"{path}: unsupported wav format tag {tag} with {bits} bits")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1).astype(np.float32)
    return x, int(rate)


def write_wav(
    path: str | Path, samples: np.ndarray, sample_rate: int, encoding: str = PCM16
) -> None:
    """Write mono samples as a PCM16 (default) or IEEE float32 wav file."""
    payload = encode_samples(np.asarray(samples, dtype=np.float32), encoding)
    width = bytes_per_sample(encoding)
    tag = _WAVE_FORMAT_PCM if encoding == PCM16 else _WAVE_FORMAT_IEEE_FLOAT
    fmt = struct.pack("<HHIIHH", tag, 1, sample_rate, sample_rate * width, width, width * 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(payload)) + payload
    if len(payload) & 1:
        body += b"\x00"
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


# --------------------------------------------------------------------------- streaming


class StreamResampler:
    """Band-limited streaming resampler (soxr) for chunks of any size; identity at equal rates.

    soxr keeps the filter state between chunks, so the concatenated output equals one-shot
    resampling of the concatenated input (no chunk-edge clicks). The price is a small,
    quality-dependent delay: soxr "LQ" holds back up to ~20 ms, "HQ"/"MQ" up to ~38 ms.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._stream = (
            None
            if self.in_rate == self.out_rate
            else soxr.ResampleStream(
                self.in_rate, self.out_rate, 1, dtype="float32", quality=quality
            )
        )

    def process(self, samples: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(samples, dtype=np.float32)
        if self._stream is None:
            return x
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """Everything still held back by the filter; call once at the end of the stream."""
        if self._stream is None:
            return np.zeros(0, np.float32)
        return self._stream.resample_chunk(np.zeros(0, np.float32), last=True)


class Reframer:
    """Cuts a stream of samples into frames of exactly `frame_size` samples."""

    def __init__(self, frame_size: int = FRAME_SIZE) -> None:
        self.frame_size = frame_size
        self._buf = np.zeros(frame_size, np.float32)
        self._fill = 0

    @property
    def pending(self) -> int:
        """Samples waiting for the next frame to complete."""
        return self._fill

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Append samples; returns the frames completed by them (each a fresh array)."""
        frames = []
        pos = 0
        n = len(samples)
        while pos < n:
            take = min(self.frame_size - self._fill, n - pos)
            self._buf[self._fill : self._fill + take] = samples[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.frame_size:
                frames.append(self._buf)
                self._buf = np.zeros(self.frame_size, np.float32)
                self._fill = 0
        return frames

    def flush(self) -> np.ndarray | None:
        """The last partial frame zero-padded to full length, or None when nothing is left."""
        if self._fill == 0:
            return None
        frame = self._buf
        frame[self._fill :] = 0.0
        self._buf = np.zeros(self.frame_size, np.float32)
        self._fill = 0
        return frame


class FrameResampler:
    """24 kHz frames in, chunks of exactly the nominal length at `out_rate` out, one per frame.

    A streaming resampler releases samples in bursts and holds some back, so a frame's output
    would otherwise vary in length. We prime the output with a little silence (the filter's
    worst-case hold-back), which makes every frame's chunk exactly
    `frame_samples_at(out_rate, t)` long at the cost of a constant few milliseconds of delay.
    """

    def __init__(self, out_rate: int, quality: str = "HQ", in_rate: int = MODEL_RATE) -> None:
        self.out_rate = int(out_rate)
        self._in_rate = int(in_rate)
        self._resampler = StreamResampler(in_rate, out_rate, quality)
        self._frames = 0
        prime = _holdback(self._in_rate, self.out_rate, quality)
        self._buf = np.zeros(prime, np.float32)
        self.underruns = 0

    def process(self, frame: np.ndarray) -> np.ndarray:
        """One 24 kHz frame (or zeros for silence) -> exactly this frame's chunk at out_rate."""
        need = ((self._frames + 1) * len(frame) * self.out_rate) // self._in_rate - (
            self._frames * len(frame) * self.out_rate
        ) // self._in_rate
        self._frames += 1
        out = self._resampler.process(frame)
        if self._buf.size:
            out = np.concatenate([self._buf, out]) if out.size else self._buf
        if out.size < need:  # should not happen with the priming above; keep lengths exact
            self.underruns += 1
            out = np.concatenate([out, np.zeros(need - out.size, np.float32)])
        self._buf = out[need:]
        return out[:need]


@functools.lru_cache(maxsize=256)
def _holdback(in_rate: int, out_rate: int, quality: str) -> int:
    """Worst-case samples soxr holds back when fed whole 1920-sample frames (measured once).

    soxr's release pattern depends only on the rates, quality and chunk sizes, not on the
    signal, so a dry run over a few dozen frames finds the priming that avoids underruns.
    """
    if in_rate == out_rate:
        return 0
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
    frame = np.zeros(FRAME_SIZE, np.float32)
    produced = 0
    worst = 0
    for t in range(1, 400):
        produced += len(stream.resample_chunk(frame))
        worst = max(worst, (t * FRAME_SIZE * out_rate) // in_rate - produced)
    return worst


# --------------------------------------------------------------------------- test signal


def speech_like(duration_s: float, sample_rate: int = MODEL_RATE, seed: int = 0) -> np.ndarray:
    """A deterministic voice-like signal: voiced syllables with formants, pitch and pauses.

    Additive synthesis of a glottal-like harmonic series whose pitch drifts between ~90 and
    ~220 Hz, shaped by three formant resonances that move per syllable, gated by a ~4 Hz
    syllable envelope with short pauses, plus a little breath noise. Good enough to exercise
    codecs and resamplers with speech-band energy; not meant to be intelligible.
    """
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * sample_rate))
    if n <= 0:
        return np.zeros(0, np.float32)
    t = np.arange(n) / sample_rate
    # Syllables ~ 150-300 ms with occasional pauses.
    bounds = [0.0]
    while bounds[-1] < duration_s:
        bounds.append(bounds[-1] + rng.uniform(0.15, 0.3))
    env = np.zeros(n)
    f1 = np.zeros(n)
    f2 = np.zeros(n)
    for a, b in zip(bounds[:-1], bounds[1:]):
        i0, i1 = int(a * sample_rate), min(n, int(b * sample_rate))
        if i1 <= i0:
            continue
        voiced = rng.random() > 0.15
        ramp = np.sin(np.linspace(0, np.pi, i1 - i0)) ** 0.7
        env[i0:i1] = ramp * (rng.uniform(0.5, 1.0) if voiced else 0.0)
        f1[i0:i1] = rng.uniform(300, 800)
        f2[i0:i1] = rng.uniform(900, 2300)
    f0 = 150 + 50 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    nyquist = sample_rate / 2
    out = np.zeros(n)
    for k in range(1, int(min(4000, nyquist * 0.9) / 90) + 1):
        fk = k * f0
        gain = (
            np.exp(-(((fk - f1) / 120.0) ** 2))
            + 0.6 * np.exp(-(((fk - f2) / 180.0) ** 2))
            + 0.25 * np.exp(-(((fk - 2800) / 300.0) ** 2))
            + 0.05 / k
        )
        gain = np.where(fk < nyquist * 0.95, gain, 0.0)
        out += gain * np.sin(k * phase)
    out = out * env + 0.01 * rng.standard_normal(n) * (env > 0)
    peak = np.max(np.abs(out)) or 1.0
    return (0.5 * out / peak).astype(np.float32)
