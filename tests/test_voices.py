"""The voices of persona sessions (services/gateway/voices.py): the voice directory and the
preparation every voice goes through (channel 0, 24 kHz, -24 LUFS, 1920-sample frames)."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest

from moshi_grpc import audio, loudness
from moshi_grpc.services.common.errors import InvalidInput, NotFound
from moshi_grpc.services.gateway.voices import VoiceDirectory, decode_voice, voice_frames
from moshi_grpc.v1 import gateway_pb2

LIMIT_S = 30.0


def _stereo_wav(path, left: np.ndarray, right: np.ndarray, rate: int) -> None:
    """A 2-channel PCM16 wav (audio.write_wav writes mono only)."""
    pcm = np.rint(np.stack([left, right], axis=1) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 2, rate, rate * 4, 4, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(pcm)) + pcm
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_a_voice_is_resampled_normalised_and_framed_with_the_last_frame_padded() -> None:
    x = audio.speech_like(1.3, 16000, seed=1) * 0.3
    frames = voice_frames(x, 16000, "the voice", LIMIT_S)
    resampler = audio.StreamResampler(16000, 24000)
    at24 = np.concatenate([resampler.process(x), resampler.flush()])
    expected, _, _ = loudness.normalize(at24, 24000)
    n = at24.size
    assert frames.shape == (-(-n // 1920), 1920) and frames.dtype == np.float32
    assert np.array_equal(frames.reshape(-1)[:n], expected)
    assert not frames.reshape(-1)[n:].any()  # the last frame zero-padded
    assert loudness.integrated_loudness(frames.reshape(-1)[:n], 24000) == pytest.approx(
        -24, abs=1e-3
    )


def test_bad_voices_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(InvalidInput, match=r"the voice is 30.01 s long; .* at most 30 s"):
        voice_frames(np.ones(240_080, np.float32) * 0.1, 8000, "the voice", LIMIT_S)
    with pytest.raises(InvalidInput, match="the voice is silent"):
        voice_frames(np.zeros(24_000, np.float32), 24000, "the voice", LIMIT_S)
    with pytest.raises(InvalidInput, match="the voice is shorter than 0.4 s"):
        voice_frames(audio.speech_like(0.3, 24000), 24000, "the voice", LIMIT_S)
    nan = audio.speech_like(1.0, 24000)
    nan[5] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        voice_frames(nan, 24000, "the voice", LIMIT_S)


def test_inline_voice_bytes_decode_in_any_accepted_encoding_or_are_refused() -> None:
    x = audio.speech_like(1.0, 8000, seed=2)
    mulaw = gateway_pb2.VoiceAudio(
        data=audio.encode_samples(x, audio.MULAW),
        encoding=gateway_pb2.AUDIO_ENCODING_MULAW,
        sample_rate=8000,
    )
    samples, rate = decode_voice(mulaw)
    assert rate == 8000 and samples.size == x.size
    bad = [
        (gateway_pb2.VoiceAudio(data=b"\x01\x02\x03", encoding=1, sample_rate=16000), "whole"),
        (gateway_pb2.VoiceAudio(data=b"OggS" + b"x" * 60, encoding=5, sample_rate=24000), "Ogg"),
        (gateway_pb2.VoiceAudio(data=b"not ogg", encoding=5, sample_rate=24000), "no samples"),
        (gateway_pb2.VoiceAudio(data=b"", encoding=1, sample_rate=16000), "empty"),
        (gateway_pb2.VoiceAudio(data=b"\x00\x00", encoding=0, sample_rate=16000), "encoding"),
        (gateway_pb2.VoiceAudio(data=b"\x00\x00", encoding=1, sample_rate=4000), "rate"),
    ]
    for voice, what in bad:
        with pytest.raises(InvalidInput, match=what):
            decode_voice(voice)


def test_the_directory_serves_wav_voices_by_stem_and_refuses_pt_voices(tmp_path, caplog) -> None:
    left = audio.speech_like(1.5, 22050, seed=3) * 0.5
    _stereo_wav(tmp_path / "alice.wav", left, np.zeros_like(left), 22050)
    audio.write_wav(tmp_path / "bob.wav", audio.speech_like(0.9, 24000, seed=4), 24000)
    (tmp_path / "NATF2.pt").write_bytes(b"torch pickle")
    (tmp_path / "notes.txt").write_text("not a voice")
    with caplog.at_level(logging.WARNING):
        voices = VoiceDirectory.load(tmp_path, LIMIT_S)
    assert sorted(voices.voices) == ["alice", "bob"]
    assert any("NATF2.pt" in r.message and "WAV" in r.message for r in caplog.records)
    # A stereo file is its channel 0 (as the reference takes), not the mix of both.
    alice = voices.get("alice")
    mono, _ = audio.read_wav(tmp_path / "alice.wav", channel=0)
    assert np.array_equal(alice.frames, voice_frames(mono, 22050, "the voice", LIMIT_S))
    info = {v.voice_id: (round(v.duration_s, 3), v.frames) for v in voices.info()}
    assert info == {"alice": (1.5, len(alice.frames)), "bob": (0.9, 12)}
    with pytest.raises(InvalidInput, match=r"\.pt voice .* supported voice format is a WAV file"):
        voices.get("NATF2")
    with pytest.raises(
        NotFound, match="unknown voice_id 'carol'; the gateway's voices: alice, bob"
    ):
        voices.get("carol")


def test_a_bad_file_in_the_directory_stops_the_start(tmp_path) -> None:
    audio.write_wav(tmp_path / "quiet.wav", np.zeros(24_000, np.float32), 24000)
    with pytest.raises(ValueError, match=r"voice file .*quiet.wav: the voice is silent"):
        VoiceDirectory.load(tmp_path, LIMIT_S)
    with pytest.raises(ValueError, match="not a directory"):
        VoiceDirectory.load(tmp_path / "missing", LIMIT_S)
    assert VoiceDirectory.load(None, LIMIT_S).info() == []
