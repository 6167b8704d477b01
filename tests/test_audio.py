"""moshi_grpc.audio: wav I/O, encodings, streaming resampling, reframing, exact output frames."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import soxr

from moshi_grpc import audio


def _tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("encoding", [audio.PCM16, audio.FLOAT32])
def test_wav_roundtrip(tmp_path, encoding: str) -> None:
    x = _tone(16000, 0.3)
    path = tmp_path / "a.wav"
    audio.write_wav(path, x, 16000, encoding)
    y, rate = audio.read_wav(path)
    assert rate == 16000
    assert y.dtype == np.float32 and y.shape == x.shape
    tol = 1.0 / 32767 if encoding == audio.PCM16 else 0.0
    assert np.max(np.abs(y - x)) <= tol + 1e-7


def test_read_wav_stereo_24bit_is_mono_average(tmp_path) -> None:
    left = np.array([0, 1 << 22, -(1 << 22)], dtype=np.int32)
    right = np.array([1 << 22, 1 << 22, 0], dtype=np.int32)
    inter = np.stack([left, right], axis=1).reshape(-1)
    data = b"".join(int(v & 0xFFFFFF).to_bytes(3, "little") for v in inter)
    fmt = struct.pack("<HHIIHH", 1, 2, 8000, 8000 * 6, 6, 24)
    body = b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data))
    path = tmp_path / "s.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body) + len(data)) + body + data)
    y, rate = audio.read_wav(path)
    assert rate == 8000
    np.testing.assert_allclose(y, [0.25, 0.5, -0.25], atol=1e-6)


def test_read_wav_rejects_garbage(tmp_path) -> None:
    path = tmp_path / "x.wav"
    path.write_bytes(b"not a wav file at all")
    with pytest.raises(audio.AudioFormatError, match="RIFF"):
        audio.read_wav(path)


def test_decode_encode_samples() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0], np.float32)
    pcm = audio.encode_samples(x, audio.PCM16)
    assert len(pcm) == 10
    np.testing.assert_allclose(audio.decode_samples(pcm, audio.PCM16), x, atol=1 / 32767)
    f = audio.encode_samples(x, audio.FLOAT32)
    np.testing.assert_array_equal(audio.decode_samples(f, audio.FLOAT32), x)
    # PCM16 clips out-of-range floats instead of wrapping around.
    clipped = audio.decode_samples(
        audio.encode_samples(np.array([3.0, -3.0]), audio.PCM16), "pcm16"
    )
    assert clipped[0] > 0.99 and clipped[1] < -0.99


@pytest.mark.parametrize(
    ("data", "encoding", "match"),
    [
        (b"\x00\x01\x02", audio.PCM16, "whole number"),
        (b"\x00" * 6, audio.FLOAT32, "whole number"),
        (b"", audio.PCM16, "empty"),
        (np.array([np.nan], "<f4").tobytes(), audio.FLOAT32, "NaN"),
        (np.array([np.inf], "<f4").tobytes(), audio.FLOAT32, "NaN or Inf"),
        (b"\x00\x00", "mulaw", "unknown encoding"),
    ],
)
def test_decode_samples_rejects_bad_input(data: bytes, encoding: str, match: str) -> None:
    with pytest.raises(audio.AudioFormatError, match=match):
        audio.decode_samples(data, encoding)


@pytest.mark.parametrize("rates", [(16000, 24000), (48000, 24000), (24000, 44100), (8000, 24000)])
def test_stream_resampler_equals_one_shot(rates: tuple[int, int]) -> None:
    """Chunked streaming gives the same samples as resampling the whole signal at once."""
    in_rate, out_rate = rates
    x = audio.speech_like(0.5, in_rate, seed=1)
    rng = np.random.default_rng(0)
    rs = audio.StreamResampler(in_rate, out_rate, "HQ")
    parts, pos = [], 0
    while pos < len(x):
        n = int(rng.integers(1, 997))
        parts.append(rs.process(x[pos : pos + n]))
        pos += n
    parts.append(rs.flush())
    streamed = np.concatenate(parts)
    one_shot = soxr.resample(x, in_rate, out_rate, quality="HQ")
    assert len(streamed) == len(one_shot)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)


def test_stream_resampler_is_band_limited() -> None:
    """Going 48 -> 16 kHz, a 10 kHz tone (above the new Nyquist) is filtered out instead of
    aliasing to 6 kHz, while a 3 kHz tone passes."""
    rs = audio.StreamResampler(48000, 16000, "LQ")
    alias = rs.process(_tone(48000, 0.5, freq=10000.0))
    assert np.sqrt(np.mean(alias[2000:] ** 2)) < 0.01
    rs = audio.StreamResampler(48000, 16000, "LQ")
    kept = rs.process(_tone(48000, 0.5, freq=3000.0))
    assert np.sqrt(np.mean(kept[2000:] ** 2)) > 0.3


def test_identity_resampler_passes_samples_through() -> None:
    x = _tone(24000, 0.1)
    rs = audio.StreamResampler(24000, 24000)
    np.testing.assert_array_equal(rs.process(x), x)
    assert rs.flush().size == 0


def test_reframer_cuts_exact_frames_and_pads_the_tail() -> None:
    rf = audio.Reframer(1920)
    x = np.arange(5000, dtype=np.float32)
    frames = rf.push(x[:100]) + rf.push(x[100:4000]) + rf.push(x[4000:])
    assert [len(f) for f in frames] == [1920, 1920]
    np.testing.assert_array_equal(np.concatenate(frames), x[:3840])
    assert rf.pending == 5000 - 3840
    tail = rf.flush()
    assert tail is not None and len(tail) == 1920
    np.testing.assert_array_equal(tail[: 5000 - 3840], x[3840:])
    assert not tail[5000 - 3840 :].any()
    assert rf.flush() is None


@pytest.mark.parametrize("rate", [8000, 11025, 12345, 16000, 22050, 44100, 48000, 24000])
@pytest.mark.parametrize("quality", ["LQ", "HQ"])
def test_frame_resampler_gives_exact_frame_lengths(rate: int, quality: str) -> None:
    fr = audio.FrameResampler(rate, quality)
    total = 0
    x = (0.1 * np.random.default_rng(2).standard_normal(24000 * 3)).astype(np.float32)
    for t in range(len(x) // 1920):
        out = fr.process(x[t * 1920 : (t + 1) * 1920])
        assert len(out) == audio.frame_samples_at(rate, t)
        total += len(out)
    frames = len(x) // 1920
    assert total == frames * 1920 * rate // 24000
    assert fr.underruns == 0


def test_frame_resampler_output_is_the_resampled_signal_delayed() -> None:
    """The exact-length chunks are the continuous resampled stream (plus a constant delay)."""
    x = audio.speech_like(1.0, 24000, seed=3)
    fr = audio.FrameResampler(16000, "LQ")
    out = np.concatenate([fr.process(x[i : i + 1920]) for i in range(0, 24000 - 1919, 1920)])
    ref = soxr.resample(x, 24000, 16000, quality="LQ")
    delay = audio._holdback(24000, 16000, "LQ")
    np.testing.assert_allclose(out[delay:], ref[: len(out) - delay], atol=1e-5)
    assert not out[:delay].any()


def test_frame_samples_at_is_cumulative_exact() -> None:
    for rate in (8000, 11025, 12345, 44100):
        total = sum(audio.frame_samples_at(rate, t) for t in range(100))
        assert total == 100 * 1920 * rate // 24000


def test_speech_like_is_deterministic_speech_band() -> None:
    a = audio.speech_like(1.0, 16000, seed=5)
    b = audio.speech_like(1.0, 16000, seed=5)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and len(a) == 16000
    assert 0.1 < np.max(np.abs(a)) <= 0.5 + 1e-6
    spectrum = np.abs(np.fft.rfft(a)) ** 2
    freqs = np.fft.rfftfreq(len(a), 1 / 16000)
    speech_band = spectrum[(freqs > 80) & (freqs < 4000)].sum()
    assert speech_band / spectrum.sum() > 0.9
    assert not np.array_equal(a, audio.speech_like(1.0, 16000, seed=6))
