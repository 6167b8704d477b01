"""Inner-monologue text: SentencePiece ids from the LM turned into text pieces for users.

Moshi's text stream is mostly padding: id 3 ("nothing new to say") and id 0 (end of a padding
run). Those, and SentencePiece control/unknown ids, are never shown. A piece's leading '▁'
(SentencePiece's word boundary) becomes a space, so concatenating pieces gives the text.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TextTokenizer", "TextTokenizerError", "BUNDLED_SMALL_MODEL"]

# A real SentencePiece model (4000 pieces, trained on Python stdlib docstrings) for the random
# "small" preset, so demos show pieces without the 32k kyutai tokenizer. See assets/README.md.
BUNDLED_SMALL_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tokenizer_small_4k.model"


class TextTokenizerError(ValueError):
    """The SentencePiece model is missing or unreadable."""


class TextTokenizer:
    """Text pieces for Moshi's text tokens (`tokenizer_spm_32k_3.model` with real weights)."""

    def __init__(
        self, path: str | Path | None = None, padding_id: int = 3, end_padding_id: int = 0
    ) -> None:
        import sentencepiece

        self.path = Path(path) if path is not None else BUNDLED_SMALL_MODEL
        if not self.path.is_file():
            raise TextTokenizerError(f"SentencePiece model not found: {self.path}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise TextTokenizerError(f"cannot load SentencePiece model {self.path}: {exc}") from exc
        self.vocab_size: int = int(self._sp.vocab_size())
        self.padding_id = padding_id
        self.end_padding_id = end_padding_id
        hidden = {padding_id, end_padding_id}
        # Precompute every piece once: piece() is called for each step of each session.
        self._pieces = [
            ""
            if i in hidden or self._sp.is_control(i) or self._sp.is_unknown(i)
            else self._sp.id_to_piece(i).replace("\u2581", " ")
            for i in range(self.vocab_size)
        ]

    def piece(self, token: int) -> str:
        """The text of `token`: '' for padding, control and out-of-vocabulary ids.

        Out-of-vocabulary ids happen only when a model's text_card exceeds this tokenizer's
        vocabulary (the random small preset with the bundled 4k model).
        """
        token = int(token)
        if 0 <= token < self.vocab_size:
            return self._pieces[token]
        return ""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (for tests and prompts)."""
        return list(self._sp.encode(text))

    def decode(self, tokens: list[int]) -> str:
        """Concatenated pieces of `tokens`, padding dropped."""
        return "".join(self.piece(t) for t in tokens)
