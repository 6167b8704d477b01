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
        (b"\x00\x00", "mp3", "unknown encoding"),
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


# --------------------------------------------------------------------------- G.711


def test_g711_reference_values() -> None:
    """Known code points of ITU-T G.711 (the tables in every telephony stack)."""
    mu = audio.decode_samples(bytes([0xFF, 0x7F, 0x00, 0x80]), audio.MULAW) * 32768
    assert mu.tolist() == [0, 0, -32124, 32124]
    a = audio.decode_samples(bytes([0xD5, 0x55, 0xAA, 0x2A]), audio.ALAW) * 32768
    assert a.tolist() == [8, -8, 32256, -32256]
    silence = np.zeros(4, np.float32)
    assert audio.encode_samples(silence, audio.MULAW) == b"\xff" * 4
    assert audio.encode_samples(silence, audio.ALAW) == b"\xd5" * 4


@pytest.mark.parametrize("encoding", [audio.MULAW, audio.ALAW])
def test_g711_codes_round_trip_and_match_audioop(encoding: str) -> None:
    """Every code decodes and re-encodes to itself (mu-law's two zeros aside), and every
    16-bit value encodes as CPython's audioop (the C reference, in Python <= 3.12) does."""
    import warnings

    codes = bytes(range(256))
    back = audio.encode_samples(audio.decode_samples(codes, encoding) * (32768 / 32767), encoding)
    differ = [c for c, d in zip(codes, back) if c != d]
    assert differ == ([0x7F] if encoding == audio.MULAW else []), differ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    pcm = np.arange(-32768, 32768, dtype="<i2")
    lin2 = audioop.lin2ulaw if encoding == audio.MULAW else audioop.lin2alaw
    mine = audio._g711_tables(encoding)[1][pcm.view(np.uint16)]
    assert mine.tobytes() == lin2(pcm.tobytes(), 2)
    to_lin = audioop.ulaw2lin if encoding == audio.MULAW else audioop.alaw2lin
    ref = np.frombuffer(to_lin(codes, 2), "<i2")
    assert (audio.decode_samples(codes, encoding) * 32768).astype(np.int32).tolist() == ref.tolist()


@pytest.mark.parametrize("encoding", [audio.MULAW, audio.ALAW])
def test_g711_wav_files_and_error(tmp_path, encoding: str) -> None:
    x = audio.speech_like(0.3, 8000, seed=2)
    path = tmp_path / "t.wav"
    audio.write_wav(path, x, 8000, encoding)
    raw = path.read_bytes()
    assert struct.unpack_from("<H", raw, 20)[0] == (7 if encoding == audio.MULAW else 6)
    y, rate = audio.read_wav(path)
    assert rate == 8000 and len(y) == len(x)
    snr = 10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2))
    assert snr > 30  # 8-bit companding: ~38 dB on speech
    assert audio.bytes_per_sample(encoding) == 1
    with pytest.raises(audio.AudioFormatError, match="empty"):
        audio.StreamDecoder(encoding, 8000).decode(b"")


# --------------------------------------------------------------------------- Ogg Opus


@pytest.mark.parametrize("rate", audio.OPUS_RATES)
def test_opus_stream_split_anywhere_decodes_like_the_whole(rate: int) -> None:
    """One encoder -> one Ogg stream; fed to a decoder in pieces cut at every kind of byte
    boundary it decodes to the same samples as in one piece."""
    x = audio.speech_like(1.0, rate, seed=1)
    enc = audio.StreamEncoder(audio.OGG_OPUS, rate)
    # Chunks of any size in (the encoder packs 80 ms packets).
    stream = b"".join(enc.encode(x[i : i + 333]) for i in range(0, len(x), 333)) + enc.flush()
    assert stream.startswith(b"OggS")
    whole = audio.StreamDecoder(audio.OGG_OPUS, rate).decode(stream)
    dec = audio.StreamDecoder(audio.OGG_OPUS, rate)
    parts, pos, step = [], 0, 1
    while pos < len(stream):
        parts.append(dec.decode(stream[pos : pos + step]))
        pos += step
        step = step % 41 + 1
    split = np.concatenate(parts)
    np.testing.assert_array_equal(split, whole)
    # All of the input comes back but for the decoder's hold-back (< 120 ms at 8 kHz).
    assert len(x) - rate * 0.12 <= len(whole) <= len(x) + rate * 0.08
    # Roughly the same signal (a perceptual codec: compare loudness, not waveforms).
    assert np.std(whole) == pytest.approx(np.std(x), rel=0.25)


def test_opus_bit_rate_is_a_tenth_of_pcm16() -> None:
    rate = 24000
    x = audio.speech_like(4.0, rate, seed=5)
    enc = audio.StreamEncoder(audio.OGG_OPUS, rate)
    n = len(enc.encode(x) + enc.flush())
    assert n / 4.0 < rate * 2 / 8  # < 6 kB/s (48 kbit/s) vs PCM16's 48 kB/s


@pytest.mark.parametrize(
    "data",
    [b"RIFF" + bytes(40), b"OggX" + bytes(40), b"garbage!" * 10],
    ids=["wav", "magic", "junk"],
)
def test_opus_decoder_rejects_non_ogg_bytes(data: bytes) -> None:
    with pytest.raises(audio.AudioFormatError, match="Ogg Opus"):
        audio.StreamDecoder(audio.OGG_OPUS, 24000).decode(data)


def test_opus_rates_and_fixed_size_only_helpers() -> None:
    for rate in audio.OPUS_RATES:
        audio.check_rate(audio.OGG_OPUS, rate)
    for rate in (11025, 22050, 44100):
        audio.check_rate(audio.MULAW, rate)
        with pytest.raises(audio.AudioFormatError, match="Ogg Opus needs"):
            audio.StreamEncoder(audio.OGG_OPUS, rate)
    with pytest.raises(audio.AudioFormatError, match="no fixed sample size"):
        audio.bytes_per_sample(audio.OGG_OPUS)
    with pytest.raises(audio.AudioFormatError, match="unknown encoding"):
        audio.StreamDecoder("mp3", 24000)


@pytest.mark.parametrize("suffix", [".opus", ".ogg", ".wav"])
def test_read_write_audio_by_suffix(tmp_path, suffix: str) -> None:
    x = audio.speech_like(0.6, 22050, seed=3)
    path = tmp_path / f"a{suffix}"
    audio.write_audio(path, x, 22050)  # 22.05 kHz: Opus files are resampled to 48 kHz
    y, rate = audio.read_audio(path)
    if suffix == ".wav":
        assert rate == 22050 and len(y) == len(x)
    else:
        assert path.read_bytes().startswith(b"OggS") and rate == 48000
        assert abs(len(y) - len(x) * 48000 / 22050) < 48000 * 0.1
