"""Zero-cost stand-in for Mimi with the same streaming interface (`--model echo`).

Encode: the code of codebook k is sample k*240 of the frame quantised to 11 bits.
Decode: codebook k's code spread over samples [k*240, (k+1)*240) as a constant level.
So decode -> encode returns the codes exactly, and results depend only on the frame:
gateway and load tests can check routing end to end without any model cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class EchoMimi:
    """Same attributes as `moshi_grpc.models.mimi.Mimi` that the services use."""

    config_name = "echo"
    sample_rate = 24000
    frame_size = 1920
    frame_rate = 12.5

    def __init__(self, num_codebooks: int = 8, cardinality: int = 2048) -> None:
        if self.frame_size % num_codebooks:
            raise ValueError(f"num_codebooks must divide {self.frame_size}, got {num_codebooks}")
        self.num_codebooks = num_codebooks
        self.cardinality = cardinality
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def streaming_encoder(self, num_rows: int) -> EchoEncoder:
        return EchoEncoder(self, num_rows)

    def streaming_decoder(self, num_rows: int) -> EchoDecoder:
        return EchoDecoder(self, num_rows)


class _EchoStreamer:
    """The streamer API of `MimiStreamingEncoder`/`Decoder` (rows, any prefix B)."""

    def __init__(self, mimi: EchoMimi, num_rows: int) -> None:
        self.mimi = mimi
        self.num_rows = num_rows
        self.span = mimi.frame_size // mimi.num_codebooks

    def reset_rows(self, rows: Sequence[int]) -> None:
        """Stateless: nothing to reset."""

    def move_row(self, src: int, dst: int) -> None:
        """Stateless: nothing to move."""

    def step(self, x: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        return self.step_unchecked(x, active)

    def step_unchecked(self, x: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class EchoEncoder(_EchoStreamer):
    def step_unchecked(self, pcm: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """pcm (B, 1920) -> codes (B, K)."""
        half = self.mimi.cardinality // 2
        picked = pcm[:, :: self.span].float()  # (N, K)
        codes = torch.floor((picked + 1.0) * half).long()
        return codes.clamp_(0, self.mimi.cardinality - 1)


class EchoDecoder(_EchoStreamer):
    def step_unchecked(self, codes: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """codes (B, K) -> pcm (B, 1920)."""
        half = self.mimi.cardinality // 2
        levels = codes.float() / half - 1.0  # (N, K)
        return levels.repeat_interleave(self.span, dim=1)
