"""The row code accumulated column by column, so the blob is read from DRAM only once.

The row code's parity column c is y_c = sum_j beta_c**j x_j over the blob's columns x_j
(each x_j the R symbols of column j). The column code visits the blob column by column
while each is in cache; evaluating y_c by Horner's rule over the same visits,
y_c <- beta_c * y_c + x_j for j = C-1 down to 0, lets the row code use those visits too
instead of reading the whole blob cold again.

The accumulators stay in place with no temporaries because every beta used by the row
codes of n <= 15 is 2**e for a small e: doubling a bit-sliced symbol is a rotation of its
8 packets (renaming, free) plus 3 packet XORs of feedback (x^8 = x^4 + x^3 + x^2 + 1), and
halving is the inverse. A Horner step costs 8 + 3|e| = ones(beta) packet XORs, as many as
a compiled Horner step, in a few multi-packet numpy calls. Packets are tracked by their
rotation; the first step chooses it so that the last step leaves it at zero.

Pure numpy; thread-safe as long as callers do not share accumulators.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from codec.codes import horner_betas
from codec.gf256 import LOG
from codec.workspace import U64Array

# Largest |e| handled; every row code with a Horner matrix below n = 16 needs at most 2.
MAX_EXPONENT = 3
# Logical packets that take packet 0's bit on a doubling: x^8 = x^4 + x^3 + x^2 + 1.
_FEEDBACK = (2, 5)


@lru_cache(maxsize=64)
def exponents(n: int, k: int) -> tuple[int, ...] | None:
    """e_c with beta_c = 2**e_c for the [n, k] code's parity rows, or None if not all small."""
    betas = horner_betas(n, k)
    if betas is None:
        return None
    exps = tuple(LOG[b] if LOG[b] < 128 else LOG[b] - 255 for b in betas)
    return exps if all(abs(e) <= MAX_EXPONENT for e in exps) else None


def _runs(first: int, stop: int, rot: int) -> Iterator[tuple[int, int, int]]:
    """(physical, logical, length) runs of logical packets first..stop-1 under `rot`."""
    b = first
    while b < stop:
        p = (b + rot) % 8
        length = min(stop - b, 8 - p)
        yield p, b, length
        b += length


class RowAccumulator:
    """Parity columns of the row code, built from the blob's columns in descending order.

    `accs[c]` holds y_c: the R symbols of parity column c as one (R, 8, w) uint64 view
    (symbol, packet, word). Logical packet b of y_c lives in physical packet
    (b + rot[c]) % 8. Not thread-safe.
    """

    def __init__(self, exps: tuple[int, ...], k: int, accs: list[U64Array]) -> None:
        """Raises ValueError for fewer than two columns (every Red Stuff row code has 3+)."""
        if k < 2:
            raise ValueError(f"a row code over {k} column(s)")
        self._exps = exps
        self._k = k
        self._next = k - 1
        self._accs = accs
        # After the k-1 steps that follow the first, the rotation must come out at zero.
        self._rot = [(k - 1) * e % 8 for e in exps]
        self._pending = accs[0]

    def add(self, j: int, column: U64Array) -> None:
        """Fold in blob column j, an (R, 8, w) view; j must count down from k-1.

        For a plain sum (beta = 1) the first column is only remembered: the second one is
        XORed with it straight into the accumulator, which saves a copy. So `column` must
        stay unchanged until the next call. Raises ValueError out of order.
        """
        if j != self._next:
            raise ValueError(f"row code column {j} out of order (expected {self._next})")
        self._next -= 1
        first = j == self._k - 1
        for c, e in enumerate(self._exps):
            acc = self._accs[c]
            if e == 0:
                if first:
                    self._pending = column
                elif j == self._k - 2:
                    np.bitwise_xor(self._pending, column, acc)
                else:
                    np.bitwise_xor(acc, column, acc)
                continue
            if not first:  # y <- beta * y, then y += x below
                for _ in range(abs(e)):
                    if e > 0:
                        self._rot[c] = (self._rot[c] - 1) % 8
                        _feedback(acc, self._rot[c])
                    else:
                        _feedback(acc, self._rot[c])
                        self._rot[c] = (self._rot[c] + 1) % 8
            for p, b, length in _runs(0, 8, self._rot[c]):
                dst, src = acc[:, p : p + length], column[:, b : b + length]
                if first:
                    np.copyto(dst, src)
                else:
                    np.bitwise_xor(dst, src, dst)


def _feedback(acc: U64Array, rot: int) -> None:
    """Logical packets 2..4 ^= logical packet 0, in every symbol of `acc`.

    One call per target packet: broadcasting the source packet instead makes numpy pick
    the broadcast axis as its inner loop, several times slower.
    """
    bit0 = acc[:, rot]
    for b in range(*_FEEDBACK):
        p = (b + rot) % 8
        np.bitwise_xor(acc[:, p], bit0, acc[:, p])
