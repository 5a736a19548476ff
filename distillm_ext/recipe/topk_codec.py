"""How the teacher cache stores the top-k of one position in a few bytes.

Each of the K entries is one code of `id_bits + logprob_bits` bits: the id in the low bits
(ceil(log2 V) of them: 16 for SmolLM2's 49152, 17 for Llama 3's 128256), and the
log-probability, quantized, above it. A position's K codes are bit-packed, little-endian, into
ceil(K * bits / 8) bytes: 112 B at K = 32 for V = 49152, 116 B for 128k vocabularies.

Log-probabilities are quantized uniformly on [logprob_floor, 0] with 2^logprob_bits levels;
anything below the floor is stored as the floor. With 12 bits and a floor of -24 a stored
log-probability is off by at most 24 / 4095 / 2 ≈ 0.0029 (a relative error of 0.29% in the
probability), and the floor's probability, 4e-11, is below anything the losses resolve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

LOGPROB_BITS = 12
LOGPROB_FLOOR = -24.0


@dataclass(frozen=True)
class TopKCodec:
    """Encodes (n, K) ids and log-probabilities as (n, bytes_per_token) uint8, and back."""

    vocab_size: int
    top_k: int
    logprob_bits: int = LOGPROB_BITS
    logprob_floor: float = LOGPROB_FLOOR

    def __post_init__(self):
        if not 1 <= self.top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size = {self.vocab_size}], got {self.top_k}")
        if not 1 <= self.logprob_bits <= 24 or self.logprob_floor >= 0:
            raise ValueError(f"logprob_bits must be in [1, 24] and logprob_floor < 0, got {self.logprob_bits} "
                             f"and {self.logprob_floor}")

    @property
    def id_bits(self) -> int:
        return max(1, (self.vocab_size - 1).bit_length())

    @property
    def entry_bits(self) -> int:
        return self.id_bits + self.logprob_bits

    @property
    def bytes_per_token(self) -> int:
        return math.ceil(self.top_k * self.entry_bits / 8)

    @property
    def step(self) -> float:
        """The distance between two quantization levels, in nats."""
        return -self.logprob_floor / ((1 << self.logprob_bits) - 1)

    @property
    def max_error(self) -> float:
        """The largest difference between a log-probability above the floor and its decoding."""
        return self.step / 2

    def encode(self, ids: torch.Tensor, logprobs: torch.Tensor) -> np.ndarray:
        """ids: (n, K) integers in [0, vocab_size); logprobs: (n, K) float, <= 0. Returns (n,
        bytes_per_token) uint8."""
        ids = ids.to(torch.int64).cpu()
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size})")
        span = -self.logprob_floor
        levels = torch.round(logprobs.double().cpu().neg().clamp(0.0, span) / self.step).to(torch.int64)
        codes = (ids | (levels << self.id_bits)).numpy()
        bits = (codes[..., None] >> np.arange(self.entry_bits)) & 1  # (n, K, entry_bits)
        return np.packbits(bits.astype(np.uint8).reshape(len(codes), -1), axis=1, bitorder="little")

    def decode(self, packed: np.ndarray, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, bytes_per_token) uint8 -> (ids (n, k) int64, logprobs (n, k) float32): the first
        `top_k` entries of each row (0 = all K), and only their bits are unpacked. The cache
        stores entries most likely first, so the first k of a top-K cache are its top-k."""
        if not 0 <= top_k <= self.top_k:
            raise ValueError(f"top_k must be in [0, {self.top_k}], got {top_k}")
        n, width = top_k or self.top_k, self.entry_bits
        bits = np.unpackbits(packed, axis=1, count=n * width, bitorder="little").reshape(len(packed), n, width)
        codes = torch.from_numpy(bits.astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64)))
        ids = codes & ((1 << self.id_bits) - 1)
        logprobs = (codes >> self.id_bits).double().mul_(-self.step).float()
        return ids, logprobs

    def to_dict(self) -> dict:
        return {**asdict(self), "id_bits": self.id_bits, "bytes_per_token": self.bytes_per_token}

    @classmethod
    def from_dict(cls, values: dict) -> "TopKCodec":
        return cls(values["vocab_size"], values["top_k"], values["logprob_bits"], values["logprob_floor"])
