"""Audio utilities shared by the gateway and the client SDK.

Everything here works on mono float32 numpy arrays. The pieces:

- wav files: `read_wav` / `write_wav` (PCM16, PCM24, PCM32 and IEEE float; multi-channel files
  are averaged to mono), written without the `wave` module because it cannot read float wavs.
- sample encodings: `decode_samples` / `encode_samples` between raw bytes (little-endian
  PCM16 or float32, or 8-bit G.711 mu-law / A-law) and float32 arrays, with clear
  `AudioFormatError`s for odd byte counts, empty chunks and NaN/Inf.
- `StreamDecoder` / `StreamEncoder`: one session's bytes <-> samples for every encoding,
  including Ogg Opus (stateful: one Ogg stream per direction, split at any byte boundary).
- Ogg Opus files: `read_opus` / `write_opus`; `read_audio` / `write_audio` pick wav or Opus
  by the file's suffix.
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
MULAW = "mulaw"  # G.711 mu-law, 8 bits per sample (North America, Japan telephony)
ALAW = "alaw"  # G.711 A-law, 8 bits per sample (European telephony)
OGG_OPUS = "opus"  # an Ogg Opus stream (RFC 7845), mono
ENCODINGS = (PCM16, FLOAT32, MULAW, ALAW, OGG_OPUS)
# Opus codes at these rates only; an Ogg Opus session must use one of them.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
OPUS_FRAME_MS = 80  # one Opus packet per 80 ms gateway frame (also the SDK's packet length)
OPUS_SUFFIXES = (".opus", ".ogg")

_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_IEEE_FLOAT = 3
_WAVE_FORMAT_ALAW = 6
_WAVE_FORMAT_MULAW = 7
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


class AudioFormatError(ValueError):
    """Audio bytes or files that cannot be interpreted (bad size, encoding, NaN, header)."""


# --------------------------------------------------------------------------- encodings


def bytes_per_sample(encoding: str) -> int:
    """Bytes per sample of a fixed-size encoding (Ogg Opus has none: AudioFormatError)."""
    if encoding == PCM16:
        return 2
    if encoding == FLOAT32:
        return 4
    if encoding in (MULAW, ALAW):
        return 1
    if encoding == OGG_OPUS:
        raise AudioFormatError("Ogg Opus has no fixed sample size: use StreamDecoder")
    raise AudioFormatError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def check_rate(encoding: str, rate: int) -> None:
    """AudioFormatError when `encoding` cannot carry audio at `rate` Hz."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFormatError(f"sample rate must be {MIN_RATE}..{MAX_RATE} Hz, got {rate}")
    if encoding == OGG_OPUS and rate not in OPUS_RATES:
        raise AudioFormatError(
            f"Ogg Opus needs a sample rate of {', '.join(map(str, OPUS_RATES))} Hz, got {rate}"
        )


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
    if encoding in (MULAW, ALAW):
        codes = np.frombuffer(data, dtype=np.uint8)
        return _g711_tables(encoding)[0][codes] * np.float32(1.0 / 32768.0)
    samples = np.frombuffer(data, dtype="<f4").astype(np.float32, copy=True)
    if samples.size and not np.isfinite(samples).all():
        raise AudioFormatError("float32 audio chunk contains NaN or Inf samples")
    return samples


def encode_samples(samples: np.ndarray, encoding: str) -> bytes:
    """float32 array -> raw bytes; PCM16 and G.711 clip to [-1, 1] and round."""
    if encoding in (PCM16, MULAW, ALAW):
        pcm = np.rint(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
        if encoding == PCM16:
            return pcm.tobytes()
        return _g711_tables(encoding)[1][pcm.view(np.uint16)].tobytes()
    if encoding == FLOAT32:
        return np.asarray(samples, dtype="<f4").tobytes()
    raise AudioFormatError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


# --------------------------------------------------------------------------- G.711


@functools.lru_cache(maxsize=2)
def _g711_tables(encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """(256 codes -> 16-bit linear as float32, 65536 int16 values (as uint16) -> code).

    The classic ITU-T G.711 reference conversions (the Sun/CCITT `g711.c` arithmetic that
    sox, audioop and telephony stacks share): mu-law quantises 14-bit magnitudes with a bias
    of 33, A-law 13-bit magnitudes; both in 8 segments of 16 steps.
    """
    code = np.arange(256, dtype=np.int32)
    pcm = np.arange(-32768, 32768, dtype=np.int32)  # every int16 value
    if encoding == MULAW:
        u = ~code & 0xFF
        t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        decode = np.where(u & 0x80, 0x84 - t, t - 0x84)
        v = pcm >> 2
        mask = np.where(v < 0, 0x7F, 0xFF)
        v = np.minimum(np.abs(v), 8159) + 33
        seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), v)
        uval = (seg << 4) | ((v >> (np.minimum(seg, 7) + 1)) & 0x0F)
        encode = np.where(seg >= 8, 0x7F, uval) ^ mask
    elif encoding == ALAW:
        a = code ^ 0x55
        t = (a & 0x0F) << 4
        seg = (a & 0x70) >> 4
        t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
        decode = np.where(a & 0x80, t, -t)
        v = pcm >> 3
        mask = np.where(v >= 0, 0xD5, 0x55)
        v = np.where(v >= 0, v, -v - 1)
        seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), v)
        low = np.where(seg < 2, v >> 1, v >> np.minimum(seg, 7)) & 0x0F
        encode = np.where(seg >= 8, 0x7F, (seg << 4) | low) ^ mask
    else:
        raise AudioFormatError(f"{encoding!r} is not a G.711 encoding")
    # Index the encode table by the int16 value's bit pattern (uint16 view), not its value.
    by_bits = np.empty(65536, np.uint8)
    by_bits[pcm.astype(np.int16).view(np.uint16)] = encode.astype(np.uint8)
    return decode.astype(np.float32), by_bits


# --------------------------------------------------------------------------- streams


def _sphn():
    try:
        import sphn
    except ImportError as exc:  # a dependency of the base install; say so clearly if absent
        raise AudioFormatError("Ogg Opus needs the `sphn` package (pip install sphn)") from exc
    return sphn


class StreamDecoder:
    """One direction of one session: encoded chunks in, float32 samples out.

    Fixed-size encodings decode chunk by chunk (`decode_samples`). Ogg Opus keeps one
    decoder for the whole stream: a chunk may end anywhere, even inside an Ogg page header,
    and then yields the samples of the pages it completed (possibly none). Invalid bytes
    raise `AudioFormatError`; after one the stream is unusable.
    """

    def __init__(self, encoding: str, sample_rate: int) -> None:
        check_rate(encoding, sample_rate)
        self.encoding = encoding
        self.sample_rate = int(sample_rate)
        self._reader = None
        if encoding == OGG_OPUS:
            self._reader = _sphn().OpusStreamReader(self.sample_rate)
        else:
            bytes_per_sample(encoding)  # unknown encodings fail here, not at the first chunk

    def decode(self, data: bytes, *, allow_empty: bool = False) -> np.ndarray:
        if self._reader is None:
            return decode_samples(data, self.encoding, allow_empty=allow_empty)
        if not data:
            if allow_empty:
                return np.zeros(0, np.float32)
            raise AudioFormatError("empty audio chunk")
        try:
            pcm = self._reader.append_bytes(bytes(data))
        except ValueError as exc:
            raise AudioFormatError(f"invalid Ogg Opus stream: {exc}") from None
        return np.asarray(pcm, dtype=np.float32).reshape(-1)


class StreamEncoder:
    """One direction of one session: float32 samples in, bytes in the encoding out.

    Ogg Opus keeps one encoder and one Ogg stream: the first bytes carry the stream's
    headers, and the concatenation of everything returned (with `flush()`) is a valid .opus
    file. Samples are coded in packets of `OPUS_FRAME_MS`; a call returns the packets it
    completed (b"" while a packet is still filling).
    """

    def __init__(self, encoding: str, sample_rate: int) -> None:
        check_rate(encoding, sample_rate)
        self.encoding = encoding
        self.sample_rate = int(sample_rate)
        self._writer = None
        if encoding == OGG_OPUS:
            self._writer = _sphn().OpusStreamWriter(self.sample_rate)
            self._packet = Reframer(self.sample_rate * OPUS_FRAME_MS // 1000)
        else:
            bytes_per_sample(encoding)

    def encode(self, samples: np.ndarray) -> bytes:
        x = np.asarray(samples, dtype=np.float32)
        if self._writer is None:
            return encode_samples(x, self.encoding)
        x = np.clip(x, -1.0, 1.0)
        return b"".join(self._writer.append_pcm(p) for p in self._packet.push(x))

    def flush(self) -> bytes:
        """The last partial Opus packet, padded with silence (b"" for other encodings)."""
        if self._writer is None:
            return b""
        last = self._packet.flush()
        return b"" if last is None else self._writer.append_pcm(last)


def read_opus(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an Ogg Opus file -> (mono float32 samples, rate). The rate is the one its header
    names when Opus can decode at it, else 48 kHz (Opus' own rate)."""
    try:
        return read_opus_bytes(Path(path).read_bytes())
    except AudioFormatError as exc:
        raise AudioFormatError(f"{path}: {exc}") from None


def read_opus_bytes(data: bytes, rate: int | None = None) -> tuple[np.ndarray, int]:
    """A whole Ogg Opus stream -> (mono float32 samples, rate); `rate` None: as `read_opus`."""
    rate = rate or opus_header_rate(data) or 48000
    return StreamDecoder(OGG_OPUS, rate).decode(data), rate


def opus_header_rate(data: bytes) -> int | None:
    """The input sample rate an Ogg Opus stream's OpusHead names, when Opus can decode at it
    (None when the header is absent, or names another rate)."""
    at = data.find(b"OpusHead", 0, 4096)
    if at < 0 or len(data) < at + 16:
        return None
    rate = struct.unpack_from("<I", data, at + 12)[0]
    return rate if rate in OPUS_RATES else None


def write_opus(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono samples as an Ogg Opus file (resampled to 48 kHz if Opus cannot code at
    `sample_rate`)."""
    x = np.asarray(samples, dtype=np.float32)
    if sample_rate not in OPUS_RATES:
        resampler = StreamResampler(sample_rate, 48000)
        x = np.concatenate([resampler.process(x), resampler.flush()])
        sample_rate = 48000
    encoder = StreamEncoder(OGG_OPUS, sample_rate)
    Path(path).write_bytes(encoder.encode(x) + encoder.flush())


def is_opus_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in OPUS_SUFFIXES


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A wav or (by suffix) Ogg Opus file -> (mono float32 samples, sample rate)."""
    return read_opus(path) if is_opus_path(path) else read_wav(path)


def write_audio(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write a wav (PCM16) or, for a .opus/.ogg path, an Ogg Opus file."""
    if is_opus_path(path):
        write_opus(path, samples, sample_rate)
    else:
        write_wav(path, samples, sample_rate)


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


def read_wav(path: str | Path, channel: int | None = None) -> tuple[np.ndarray, int]:
    """Read a wav file -> (mono float32 samples, sample rate): its channels averaged, or only
    channel `channel` (what PersonaPlex takes of a voice prompt: channel 0)."""
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
    elif tag in (_WAVE_FORMAT_MULAW, _WAVE_FORMAT_ALAW) and bits == 8:
        x = decode_samples(data, MULAW if tag == _WAVE_FORMAT_MULAW else ALAW, allow_empty=True)
    else:
        raise AudioFormatError(f"{path}: unsupported wav format tag {tag} with {bits} bits")
    if channel is not None:
        if not 0 <= channel < channels:
            raise AudioFormatError(f"{path}: no channel {channel} ({channels} channel(s))")
        x = np.ascontiguousarray(x.reshape(-1, channels)[:, channel])
    elif channels > 1:
        x = x.reshape(-1, channels).mean(axis=1).astype(np.float32)
    return x, int(rate)


def write_wav(
    path: str | Path, samples: np.ndarray, sample_rate: int, encoding: str = PCM16
) -> None:
    """Write mono samples as a PCM16 (default), IEEE float32, mu-law or A-law wav file."""
    payload = encode_samples(np.asarray(samples, dtype=np.float32), encoding)
    width = bytes_per_sample(encoding)
    tag = {
        PCM16: _WAVE_FORMAT_PCM,
        FLOAT32: _WAVE_FORMAT_IEEE_FLOAT,
        MULAW: _WAVE_FORMAT_MULAW,
        ALAW: _WAVE_FORMAT_ALAW,
    }[encoding]
    fmt = struct.pack("<HHIIHH", tag, 1, sample_rate, sample_rate * width, width, width * 8)
    if tag != _WAVE_FORMAT_PCM:
        fmt += struct.pack("<H", 0)  # cbSize: non-PCM formats carry the extension size
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
