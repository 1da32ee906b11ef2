"""Red Stuff parameters: n nodes, f faults, R = n-2f rows, C = n-f columns, symbol size.

Pure; immutable values, thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from codec.errors import ParameterError

MIN_NODES = 4
MAX_NODES = 256
# Symbols are whole multiples of 64 bytes: 8 packets of whole uint64 words each.
SYMBOL_ALIGN = 64


@dataclass(frozen=True)
class Params:
    """Code parameters of a volume. Raises ParameterError when out of range."""

    n: int
    f: int

    def __post_init__(self) -> None:
        if not MIN_NODES <= self.n <= MAX_NODES:
            raise ParameterError(f"n={self.n} nodes: must be {MIN_NODES}..{MAX_NODES}")
        if self.f < 1 or self.n < 3 * self.f + 1:
            raise ParameterError(
                f"f={self.f} faults with n={self.n}: need f >= 1 and n >= 3f+1 "
                f"(at most f={(self.n - 1) // 3})"
            )

    @classmethod
    def for_nodes(cls, n: int, f: int | None = None) -> Params:
        """Parameters for n nodes; f defaults to the largest allowed, (n-1)//3."""
        return cls(n, (n - 1) // 3 if f is None else f)

    @property
    def R(self) -> int:
        """Rows of the blob matrix = symbols per secondary sliver = primaries needed."""
        return self.n - 2 * self.f

    @property
    def C(self) -> int:
        """Columns of the blob matrix = symbols per primary sliver = secondaries needed."""
        return self.n - self.f

    def symbol_size(self, length: int) -> int:
        """The smallest multiple of 64 bytes such that R*C symbols hold `length` bytes."""
        if length < 0:
            raise ParameterError(f"negative blob length {length}")
        cells = self.R * self.C
        per_symbol = -(-max(length, 1) // cells)
        return -(-per_symbol // SYMBOL_ALIGN) * SYMBOL_ALIGN

    def primary_of_pair(self, pair: int) -> int:
        """Pair p holds primary sliver p."""
        return pair

    def secondary_of_pair(self, pair: int) -> int:
        """Pair p holds secondary sliver n-1-p, so every pair holds a systematic sliver."""
        return self.n - 1 - pair
