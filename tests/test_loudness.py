"""Voice loudness normalisation (moshi_grpc/loudness.py) against PersonaPlex's own results.

tests/fixtures/persona/loudness.json holds what NVIDIA's `normalize_audio` (pyloudnorm,
BS.1770-4 at 24 kHz, gain to -24 LUFS) gave on five signals that `loudness_signal` in
tools/make_persona_golden.py rebuilds exactly; that file is imported by path (it imports
NVIDIA's package only inside its functions).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
from conftest import FIXTURES, REPO_ROOT

from moshi_grpc import loudness

RATE = 24000


@pytest.fixture(scope="module")
def golden():
    spec = importlib.util.spec_from_file_location(
        "make_persona_golden", REPO_ROOT / "tools" / "make_persona_golden.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = json.loads((FIXTURES / "persona" / "loudness.json").read_text())
    assert cases["target_lufs"] == loudness.TARGET_LUFS and cases["sample_rate"] == RATE
    return module.loudness_signal, cases["cases"]


def test_the_reference_results_are_reached_bit_for_bit(golden) -> None:
    signal, cases = golden
    assert len(cases) == 5
    for case in cases:
        x = signal(case["segments"])
        normalized, lufs, gain = loudness.normalize(x, RATE)
        # The loudness is pyloudnorm's to the last bit; the gain is numpy's power of it, as
        # pyloudnorm's `normalize.loudness` computes it (the fixture's was Python's `**`,
        # which may round the last bit the other way).
        assert lufs == case["integrated_lufs"], case["name"]
        assert gain == pytest.approx(case["gain"], rel=1e-15, abs=0), case["name"]
        assert normalized.dtype == np.float32 and normalized.shape == x.shape
        digest = hashlib.sha256(normalized.tobytes()).hexdigest()
        assert digest == case["normalized_float32_sha256"], case["name"]


def test_the_normalised_voice_measures_at_the_target(golden) -> None:
    signal, cases = golden
    x = signal(cases[1]["segments"])
    normalized, _, _ = loudness.normalize(x, RATE)
    assert loudness.integrated_loudness(normalized, RATE) == pytest.approx(-24.0, abs=1e-4)


def test_silence_and_a_voice_shorter_than_one_block_are_refused() -> None:
    with pytest.raises(loudness.LoudnessError, match="silent"):
        loudness.normalize(np.zeros(RATE, np.float32), RATE)
    with pytest.raises(loudness.LoudnessError, match="silent"):  # all below -70 LUFS
        loudness.normalize(np.full(RATE, 1e-5, np.float32), RATE)
    with pytest.raises(loudness.LoudnessError, match="shorter than 0.4 s"):
        loudness.normalize(np.ones(9599, np.float32) * 0.1, RATE)
    assert np.isfinite(loudness.integrated_loudness(np.ones(9600, np.float32) * 0.1, RATE))
