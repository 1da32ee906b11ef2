"""A slow, independent model of the codec's arithmetic, for checking the XOR programs.

A symbol's element t is made of bit t of each of its 8 packets (packet b = bit b). This
model unpacks those bits, multiplies with log/exp tables, and packs them again.
"""

from __future__ import annotations

import numpy as np

EXP = [0] * 512
LOG = [0] * 256
_x = 1
for _i in range(255):
    EXP[_i] = _x
    LOG[_x] = _i
    _x <<= 1
    if _x & 0x100:
        _x ^= 0x11D
for _i in range(255, 512):
    EXP[_i] = EXP[_i - 255]

MUL = np.zeros((256, 256), dtype=np.uint8)
for _a in range(1, 256):
    for _b in range(1, 256):
        MUL[_a, _b] = EXP[LOG[_a] + LOG[_b]]


def to_elements(symbol: bytes) -> np.ndarray:
    """The field elements of one symbol, one per bit position of a packet."""
    packets = np.frombuffer(symbol, dtype=np.uint8).reshape(8, -1)
    bits = np.unpackbits(packets, axis=1, bitorder="little")
    weights = (1 << np.arange(8, dtype=np.uint16))[:, None]
    return (bits.astype(np.uint16) * weights).sum(axis=0).astype(np.uint8)


def from_elements(elements: np.ndarray) -> bytes:
    """Inverse of to_elements."""
    bits = ((elements[None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).astype(np.uint8)
    return np.packbits(bits, axis=1, bitorder="little").tobytes()


def apply(matrix: tuple[tuple[int, ...], ...], symbols: list[bytes]) -> list[bytes]:
    """out_i = sum_j matrix[i][j] * symbols[j], element by element."""
    elems = [to_elements(s) for s in symbols]
    out = []
    for row in matrix:
        acc = np.zeros_like(elems[0])
        for coef, e in zip(row, elems, strict=True):
            acc ^= MUL[coef][e]
        out.append(from_elements(acc))
    return out
