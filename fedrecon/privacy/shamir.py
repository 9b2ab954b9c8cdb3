"""Shamir secret sharing over the prime field GF(2^521 - 1).

Used by secure aggregation to share 32-byte secrets (self-mask seeds and masking private
keys): any ``threshold`` shares recover a secret, fewer reveal nothing about it
(information-theoretically). Coefficients come from :mod:`secrets` (the OS CSPRNG).

Shamir, "How to share a secret", Communications of the ACM 22(11), 1979.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

__all__ = ["PRIME", "Share", "combine_shares", "int_to_secret", "secret_to_int", "split_secret"]

#: The Mersenne prime 2^521 - 1: larger than any 32-byte secret, cheap to reduce by.
PRIME = (1 << 521) - 1

#: ``(x, y)``: the polynomial's value ``y`` at the nonzero point ``x``.
Share = tuple[int, int]


def secret_to_int(secret: bytes) -> int:
    if len(secret) > 64:
        raise ValueError(f"argument 'secret' must be at most 64 bytes; got {len(secret)}")
    return int.from_bytes(secret, "big")


def int_to_secret(value: int, length: int = 32) -> bytes:
    if not 0 <= value < 1 << (8 * length):
        raise ValueError(f"value does not fit in {length} bytes (a wrong or tampered share?)")
    return value.to_bytes(length, "big")


def split_secret(secret: int, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at the points ``xs`` (distinct, in ``[1, PRIME)``); any
    ``threshold`` of them recover it."""
    if not 0 <= secret < PRIME:
        raise ValueError("argument 'secret' must lie in [0, PRIME)")
    if threshold < 1:
        raise ValueError(f"argument 'threshold' must be >= 1; got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("argument 'xs' must hold distinct points in [1, PRIME)")
    if threshold > len(xs):
        raise ValueError(f"argument 'threshold' ({threshold}) exceeds the number of shares "
                         f"({len(xs)})")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine_shares(shares: Sequence[Share], *, threshold: int | None = None) -> int:
    """Lagrange interpolation at 0 through ``shares`` (at least ``threshold`` of them: more
    points of a lower-degree polynomial give the same value, fewer a wrong one -- which is
    why fewer than ``threshold``, when given, is refused)."""
    if not shares:
        raise ValueError("argument 'shares' is empty")
    if threshold is not None and len(shares) < threshold:
        raise ValueError(f"argument 'shares' holds {len(shares)} shares; the secret needs "
                         f"threshold = {threshold}")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("argument 'shares' has repeated points")
    total = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total
