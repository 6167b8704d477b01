"""Text pieces from Moshi's text tokens with real SentencePiece models."""

from __future__ import annotations

import pytest

from moshi_grpc.models.text import BUNDLED_SMALL_MODEL, TextTokenizer, TextTokenizerError

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello there, how are you doing today?",
    "moshi listens and speaks at the same time",
    "streaming speech needs low latency and steady frames",
] * 20


def test_bundled_model_pieces() -> None:
    tok = TextTokenizer(None)
    assert tok.path == BUNDLED_SMALL_MODEL
    assert tok.vocab_size == 4000
    assert tok.piece(3) == "" and tok.piece(0) == ""  # padding / end of padding
    assert tok.piece(1) == "" and tok.piece(2) == ""  # control pieces
    ids = tok.encode("Return the value of the object.")
    pieces = [tok.piece(i) for i in ids]
    assert "".join(pieces) == " Return the value of the object."
    assert " the" in pieces  # SentencePiece's '▁' became a space
    assert tok.decode([3, *ids, 0, 3]) == " Return the value of the object."
    assert tok.piece(31999) == "" and tok.piece(-5) == ""  # beyond this vocabulary


def test_model_trained_at_test_time(tmp_path) -> None:
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(prefix),
        vocab_size=50,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    tok = TextTokenizer(f"{prefix}.model")
    assert tok.vocab_size == 50
    ids = tok.encode("the lazy fox")
    assert tok.decode(ids) == " the lazy fox"
    assert all(tok.piece(i) for i in ids)
    assert tok.piece(3) == ""
    custom = TextTokenizer(f"{prefix}.model", padding_id=5, end_padding_id=6)
    assert custom.piece(5) == "" and custom.piece(6) == ""
    assert custom.piece(3) == ""  # still SentencePiece's own <pad> control piece


def test_missing_or_broken_model(tmp_path) -> None:
    with pytest.raises(TextTokenizerError, match="not found"):
        TextTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="cannot load"):
        TextTokenizer(junk)
