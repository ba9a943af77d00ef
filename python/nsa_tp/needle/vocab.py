"""Token ids and codes of the needle task (associative recall); pure host arithmetic, no torch model.

Token kinds (ids in this order, the vocabulary rounded up to a multiple of 128; ids past the last fact token
are unused fillers):

- ``0, 1``: BOS / EOS (the config names them; prompts never hold EOS);
- filler ``F(i)``, ``i < n_fillers``: the haystack;
- query ``Q(k)``, ``k < n_keys``: "what was stored under key k?";
- answer ``A(v)``, ``v < n_values``: the right next token after ``Q(k)`` when the prompt earlier held ``D(k, v)``;
- fact ``D(k, v)``: one token carrying key ``k`` and value ``v``.

Keys and values are codes: rows of a 64 x 64 Sylvester Hadamard matrix divided by 8 (entries +-1/8, norm 1,
exactly orthogonal, exact in bfloat16 and in fp8), assigned to keys and values by a seeded permutation and sign.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["NeedleVocab", "hadamard_codes", "CODE_DIM", "BOS", "EOS"]

BOS, EOS = 0, 1

CODE_DIM = 64  # one code block: the indexer's 64 content dims (128 minus its 64 rope dims) bound the key count


def hadamard_codes(seed: int, n: int, salt: int) -> torch.Tensor:
    """``[n, 64]`` float32 orthonormal codes (``n <= 64``): signed, permuted Hadamard rows / 8."""
    if not 1 <= n <= CODE_DIM:
        raise ValueError(f"n: expected 1..{CODE_DIM} codes (orthogonal in {CODE_DIM} dims), got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < CODE_DIM:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed * 7919 + salt)
    rows = torch.randperm(CODE_DIM, generator=gen)[:n]
    signs = torch.randint(0, 2, (n, 1), generator=gen).float() * 2 - 1
    return h[rows] * signs / 8.0


@dataclasses.dataclass(frozen=True)
class NeedleVocab:
    """The id of every token kind (see the module docstring)."""

    n_keys: int = 64
    n_values: int = 64
    n_fillers: int = 64

    def __post_init__(self) -> None:
        for name in ("n_keys", "n_values"):
            v = getattr(self, name)
            if not 1 <= v <= CODE_DIM:
                raise ValueError(f"{name}: expected 1..{CODE_DIM}, got {v}")
        if self.n_fillers < 1:
            raise ValueError(f"n_fillers: expected >= 1, got {self.n_fillers}")

    def filler(self, i: int) -> int:
        return 2 + i

    def query(self, k: int) -> int:
        return 2 + self.n_fillers + k

    def answer(self, v: int) -> int:
        return 2 + self.n_fillers + self.n_keys + v

    def fact(self, k: int, v: int) -> int:
        return 2 + self.n_fillers + self.n_keys + self.n_values + k * self.n_values + v

    @property
    def used(self) -> int:
        """Ids ``[0, used)`` have a meaning; the rest pad the vocabulary."""
        return self.fact(self.n_keys - 1, self.n_values - 1) + 1

    @property
    def size(self) -> int:
        return -(-self.used // 128) * 128

    def kind(self, token: int) -> tuple[str, int, int]:
        """``(kind, key, value)`` of an id: kind in ``special | filler | query | answer | fact | unused``."""
        f, k, v = self.n_fillers, self.n_keys, self.n_values
        if token < 2:
            return "special", -1, -1
        t = token - 2
        if t < f:
            return "filler", -1, -1
        t -= f
        if t < k:
            return "query", t, -1
        t -= k
        if t < v:
            return "answer", -1, t
        t -= v
        if t < k * v:
            return "fact", t // v, t % v
        return "unused", -1, -1
