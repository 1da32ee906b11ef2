"""Arithmetic in GF(2^8) and the coding matrices of the two systematic MDS codes.

Field: polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator 2. Matrices are tuples of
tuples of ints so they can be cached and hashed. Bit matrices represent multiplication by
an element as an 8x8 matrix over GF(2): that is how the codec turns every multiply into
XORs of whole packets (see codec.xorsched).

Pure Python and stdlib only; everything here is immutable or cached, so thread-safe.
"""

from __future__ import annotations

from functools import lru_cache

POLY = 0x11D

Matrix = tuple[tuple[int, ...], ...]


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 512
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, log


EXP, LOG = _tables()


def mul(a: int, b: int) -> int:
    """Product of two field elements."""
    if a == 0 or b == 0:
        return 0
    return EXP[LOG[a] + LOG[b]]


def inv(a: int) -> int:
    """Multiplicative inverse; raises ZeroDivisionError for 0."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return EXP[255 - LOG[a]]


@lru_cache(maxsize=256)
def bitmatrix(e: int) -> tuple[int, ...]:
    """Multiplication by e as 8 row masks: output bit i = parity(row[i] & input bits)."""
    rows = [0] * 8
    for j in range(8):
        col = mul(e, 1 << j)
        for i in range(8):
            if col >> i & 1:
                rows[i] |= 1 << j
    return tuple(rows)


def ones(e: int) -> int:
    """Number of ones in e's bit matrix: the XOR cost of multiplying by e."""
    return sum(bin(r).count("1") for r in bitmatrix(e))


def mat_mul(a: Matrix, b: Matrix) -> Matrix:
    """Matrix product over GF(2^8)."""
    cols = len(b[0])
    out = []
    for row in a:
        acc = [0] * cols
        for x, brow in zip(row, b, strict=True):
            if x:
                for j, y in enumerate(brow):
                    if y:
                        acc[j] ^= mul(x, y)
        out.append(tuple(acc))
    return tuple(out)


def mat_inv(m: Matrix) -> Matrix:
    """Inverse of a square matrix by Gauss-Jordan; raises ValueError if singular."""
    k = len(m)
    a = [list(row) + [1 if i == j else 0 for j in range(k)] for i, row in enumerate(m)]
    for col in range(k):
        pivot = next((r for r in range(col, k) if a[r][col]), None)
        if pivot is None:
            raise ValueError("singular matrix")
        a[col], a[pivot] = a[pivot], a[col]
        scale = inv(a[col][col])
        a[col] = [mul(scale, x) for x in a[col]]
        for r in range(k):
            if r != col and a[r][col]:
                factor = a[r][col]
                a[r] = [x ^ mul(factor, y) for x, y in zip(a[r], a[col], strict=True)]
    return tuple(tuple(row[k:]) for row in a)


def cauchy_parity(n: int, k: int) -> Matrix:
    """A normalised (n-k) x k Cauchy matrix: [I_k ; P] is MDS for any n <= 256.

    P[i][j] = 1/(x_i + y_j) with y_j = j and x_i = k + i, scaled by columns so row 0 is all
    ones (plain XOR parity), then each further row by the factor leaving the fewest ones in
    its bit matrices. Scaling rows and columns keeps every square submatrix nonsingular.
    """
    m = n - k
    rows = [[inv((k + i) ^ j) for j in range(k)] for i in range(m)]
    col_scale = [inv(x) for x in rows[0]]
    rows = [[mul(x, c) for x, c in zip(row, col_scale, strict=True)] for row in rows]
    for i in range(1, m):
        best = min(
            (sum(ones(mul(x, inv(d))) for x in rows[i]), inv(d)) for d in sorted(set(rows[i]))
        )
        rows[i] = [mul(x, best[1]) for x in rows[i]]
    return tuple(tuple(row) for row in rows)


def det(m: list[list[int]]) -> int:
    """Determinant of a square matrix (destroys its argument)."""
    k = len(m)
    result = 1
    for col in range(k):
        pivot = next((r for r in range(col, k) if m[r][col]), None)
        if pivot is None:
            return 0
        m[col], m[pivot] = m[pivot], m[col]
        p = m[col][col]
        result = mul(result, p)
        scale = inv(p)
        for r in range(col + 1, k):
            if m[r][col]:
                factor = mul(m[r][col], scale)
                m[r] = [x ^ mul(factor, y) for x, y in zip(m[r], m[col], strict=True)]
    return result
