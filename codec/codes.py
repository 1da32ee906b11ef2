"""The two systematic MDS codes of Red Stuff and their compiled XOR programs.

For an [n, k] code the generator is [I_k ; P]. P is chosen once per (n, k), and that
choice is part of the on-disk format:

- Where the check is affordable, P[r][j] = beta_r ** j with distinct betas picked greedily
  by XOR cost (1, 2, 2^-1, ...), each accepted only if every square submatrix of P stays
  nonsingular (super-regular), which is exactly what makes [I ; P] MDS. Such rows encode by
  Horner's rule at ones(beta) XORs per input packet set, about 2.5x fewer than a general
  element, and their few, cheap elements also leave CSE much to share (the schedule used
  is whichever of the two needs fewer XORs; it is not part of the format).
- Otherwise (large n) P is a normalised Cauchy matrix, MDS by construction.

Pure; results are cached and immutable, so thread-safe.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb

from codec.errors import ParameterError
from codec.gf256 import EXP, Matrix, cauchy_parity, det, mat_inv, mat_mul, ones
from codec.xorsched import Program, horner_program, matrix_program

# Upper bound on square submatrices examined when choosing Horner betas; beyond it the
# Cauchy construction is used. Part of the format: changing it changes codes for large n.
SUPER_REGULAR_BUDGET = 40_000


def _power(beta: int, j: int) -> int:
    if j == 0:
        return 1
    log = next(i for i in range(255) if EXP[i] == beta)
    return EXP[(log * j) % 255]


def _accepts(rows: list[list[int]], new: list[int]) -> bool:
    """True if adding `new` keeps every square submatrix nonsingular."""
    k = len(new)
    for t in range(1, min(len(rows) + 1, k) + 1):
        for prev in combinations(range(len(rows)), t - 1):
            for cols in combinations(range(k), t):
                sub = [[rows[r][c] for c in cols] for r in prev] + [[new[c] for c in cols]]
                if det(sub) == 0:
                    return False
    return True


@lru_cache(maxsize=64)
def horner_betas(n: int, k: int) -> tuple[int, ...] | None:
    """The betas of the Horner-evaluable parity matrix, or None where Cauchy is used."""
    m = n - k
    work = sum(comb(r, t - 1) * comb(k, t) for r in range(m) for t in range(1, min(r + 1, k) + 1))
    if work > SUPER_REGULAR_BUDGET:
        return None
    candidates = sorted(range(1, 256), key=lambda b: (ones(b), b))
    betas: list[int] = []
    rows: list[list[int]] = []
    for beta in candidates:
        if len(betas) == m:
            break
        row = [_power(beta, j) for j in range(k)]
        if _accepts(rows, row):
            betas.append(beta)
            rows.append(row)
    return tuple(betas) if len(betas) == m else None


@lru_cache(maxsize=64)
def parity_matrix(n: int, k: int) -> Matrix:
    """The (n-k) x k parity part P of the [n, k] code; raises ParameterError if none exists."""
    if not 1 <= k < n <= 256:
        raise ParameterError(f"no systematic [n={n}, k={k}] code over GF(2^8)")
    betas = horner_betas(n, k)
    if betas is None:
        return cauchy_parity(n, k)
    return tuple(tuple(_power(b, j) for j in range(k)) for b in betas)


@lru_cache(maxsize=64)
def generator(n: int, k: int) -> Matrix:
    """The n x k generator [I_k ; P]."""
    ident = tuple(tuple(1 if i == j else 0 for j in range(k)) for i in range(k))
    return ident + parity_matrix(n, k)


@lru_cache(maxsize=64)
def parity_program(n: int, k: int) -> Program:
    """The program computing the n-k parity symbols from the k source symbols.

    Horner's rule and the common-subexpression compiler are both tried; the fewer XORs
    win (CSE does at every n measured: 78 vs 88 for the n=7 column code).
    """
    general = matrix_program(parity_matrix(n, k))
    betas = horner_betas(n, k)
    if betas is None:
        return general
    return min(horner_program(betas, k), general, key=lambda prog: prog.xors)


@lru_cache(maxsize=1024)
def solve_program(n: int, k: int, known: tuple[int, ...], wanted: tuple[int, ...]) -> Program:
    """The program computing codeword positions `wanted` from the k positions `known`.

    Raises ParameterError unless `known` is k distinct positions below n.
    """
    if len(known) != k or len(set(known)) != k or not all(0 <= i < n for i in known):
        raise ParameterError(f"need {k} distinct positions below {n}, got {known}")
    g = generator(n, k)
    return matrix_program(mat_mul(tuple(g[i] for i in wanted), mat_inv(tuple(g[i] for i in known))))


def cheapest_known(
    n: int, k: int, available: tuple[int, ...], wanted: tuple[int, ...]
) -> tuple[int, ...]:
    """Choose k of `available` positions that make computing `wanted` cheapest.

    Systematic positions are preferred (they are the data itself); among the remaining
    choices the one with the fewest XORs wins. Raises ParameterError if fewer than k.
    """
    if len(set(available)) < k:
        raise ParameterError(f"need {k} positions, have {len(set(available))}")
    avail = sorted(set(available))
    systematic = [i for i in avail if i < k]
    parity = [i for i in avail if i >= k]
    need = k - len(systematic)
    options = list(combinations(parity, need))
    if len(options) > 20:
        options = options[:1]
    best = min(
        options, key=lambda extra: solve_program(n, k, tuple(systematic) + extra, wanted).xors
    )
    return tuple(systematic) + best
