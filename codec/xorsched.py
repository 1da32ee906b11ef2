"""XOR programs: GF(2^8) linear maps on whole symbols, executed as numpy XORs of packets.

A symbol of s bytes is 8 packets of s/8 bytes; packet b holds bit b of every field element
in the symbol (the Cauchy bit-matrix representation). Multiplying a symbol by a field
element is then a fixed set of packet XORs, so a linear map over k input symbols becomes a
straight-line program of XORs, compiled once per matrix and cached.

Two compilers feed one executor:
- `matrix_program`: any matrix via bit matrices, with greedy common-subexpression
  elimination (Paar's algorithm) so shared pairs of packets are XORed once, then each
  output sought as one or two XORs of values already computed (cancellation).
- `horner_program`: rows of the form sum_j beta^j x_j, evaluated by Horner's rule; a step
  costs ones(beta) XORs (11 for beta = 2), less than half a general multiply.

Programs finish their output symbols one after another, so a caller can hash each while
it is in cache. They are executed in steps over packet words whose registers fit in
cache. The executor takes arrays with a leading batch axis, so one call codes many rows or
columns that share a code.

Pure numpy + stdlib; programs are immutable and cached; `run` uses only caller buffers
plus a scratch (the caller's or its own), so it is thread-safe.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np
import numpy.typing as npt

from codec.gf256 import Matrix, bitmatrix

U64Array = npt.NDArray[np.uint64]

# Bytes of registers (inputs, outputs, temps) one step of a program may touch. Measured on
# the target machine (Zen, 1 MiB L2, 32 MiB shared L3): a numpy call costs ~0.6 us (1D) to
# ~1.5 us (2D), worth 15-40 KiB of in-cache XOR, so steps must stay large, and whole
# packets beat smaller steps until a step's registers spill out of L3 (decoding n=7 at
# 16 MiB, 5 symbols per sliver: 16-24 MiB steps ~2300 MB/s, 4 MiB ~1500, 48 MiB ~2000).
WORKING_SET = 24 << 20
# Below this many words per step the per-call overhead dominates whatever the cache does.
MIN_CHUNK_WORDS = 1024
# From this many words per packet (64 KiB) a batch too big for whole-packet steps runs
# symbol by symbol (see run). Measured: decoding n=10 at 16 MiB (73 KiB packets) +50-75%,
# n=7 at 16 MiB +20-30%; with 35 KiB packets (n=7, 4 MiB) it would lose 25%.
ROW_BY_ROW_WORDS = 8192
# Above this many bit-matrix ones, CSE's pair counting costs more than it saves.
CSE_MAX_ONES = 1500
# Values whose pairwise XORs are remembered for cancellation (memory ~ its square).
CANCEL_MAX_VALUES = 400


@dataclass(frozen=True)
class Program:
    """A compiled XOR program. Registers: inputs, then outputs, then temps.

    `ops` are (dst, a, b): dst = a ^ b, or dst = a when b == -1. Output symbols are
    completed one after another: output symbol t (registers n_in + 8t ..) is final once
    the first `done[t]` ops have run, so a caller can use it while it is still in cache.
    """

    n_in: int
    n_out: int
    n_temp: int
    ops: tuple[tuple[int, int, int], ...]
    done: tuple[int, ...]

    @property
    def xors(self) -> int:
        """Number of packet XORs (copies excluded)."""
        return sum(1 for op in self.ops if op[2] >= 0)


def _demand_order(n_in: int, ssa: list[tuple[int, int]], outputs: list[int]) -> list[list[int]]:
    """SSA values grouped by the output symbol that first needs them, each group in order.

    Computing each output symbol's values just before it (rather than every shared value
    first) finishes the outputs one by one and keeps fewer temps alive at once.
    """
    seen: set[int] = set()
    groups = []
    for g in range(0, len(outputs), 8):
        need = []
        stack = [v for v in outputs[g : g + 8] if v >= n_in]
        while stack:
            v = stack.pop()
            if v < n_in or v in seen:
                continue
            seen.add(v)
            need.append(v)
            stack.extend(ssa[v - n_in])
        groups.append(sorted(need))  # SSA order is a topological order
    return groups


def _allocate(n_in: int, ssa: list[tuple[int, int]], outputs: list[int]) -> Program:
    """Order the SSA values by output symbol, then map them to registers, reusing temps
    once their last reader has run."""
    groups = _demand_order(n_in, ssa, outputs)
    order = [v for group in groups for v in group]
    last_use: dict[int, int] = {}
    for idx, v in enumerate(order):
        a, b = ssa[v - n_in]
        last_use[a] = idx
        last_use[b] = idx
    out_reg: dict[int, int] = {}
    for slot, value in enumerate(outputs):
        if value >= n_in and value not in out_reg:
            out_reg[value] = n_in + slot
    base_temp = n_in + len(outputs)
    reg: dict[int, int] = {v: v for v in range(n_in)}
    free: list[int] = []
    n_temp = 0
    ops: list[tuple[int, int, int]] = []
    done = []
    idx = 0
    for g, group in enumerate(groups):
        for value in group:
            a, b = ssa[value - n_in]
            ra, rb = reg[a], reg[b]
            for operand in (a, b):
                if last_use.get(operand) == idx and operand >= n_in and operand not in out_reg:
                    free.append(reg[operand])
            if value in out_reg:
                dst = out_reg[value]
            elif free:
                dst = free.pop()
            else:
                dst = base_temp + n_temp
                n_temp += 1
            reg[value] = dst
            ops.append((dst, ra, rb))
            idx += 1
        for slot in range(8 * g, 8 * g + 8):
            if reg[outputs[slot]] != n_in + slot:
                ops.append((n_in + slot, reg[outputs[slot]], -1))
        done.append(len(ops))
    return Program(n_in=n_in, n_out=len(outputs), n_temp=n_temp, ops=tuple(ops), done=tuple(done))


def _xor_chain(ssa: list[tuple[int, int]], terms: list[int], n_in: int) -> int:
    """Append XORs summing `terms`; return the SSA value of the sum."""
    acc = terms[0]
    for t in terms[1:]:
        ssa.append((acc, t))
        acc = n_in + len(ssa) - 1
    return acc


@lru_cache(maxsize=1024)
def matrix_program(matrix: Matrix) -> Program:
    """Program computing out_i = sum_j matrix[i][j] * in_j for symbols.

    Raises ValueError for an all-zero row (it would leave an output undefined).
    """
    k = len(matrix[0])
    n_in = 8 * k
    sets: list[set[int]] = []
    for row in matrix:
        for bit in range(8):
            terms = {
                8 * j + c
                for j, e in enumerate(row)
                if e
                for c in range(8)
                if bitmatrix(e)[bit] >> c & 1
            }
            if not terms:
                raise ValueError("matrix row is zero")
            sets.append(terms)
    ssa: list[tuple[int, int]] = []
    if sum(len(s) for s in sets) <= CSE_MAX_ONES:
        while True:
            pairs: Counter[tuple[int, int]] = Counter()
            for s in sets:
                pairs.update(combinations(sorted(s), 2))
            if not pairs:
                break
            (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
            if count < 2:
                break
            ssa.append((a, b))
            value = n_in + len(ssa) - 1
            for s in sets:
                if a in s and b in s:
                    s -= {a, b}
                    s.add(value)
    return _allocate(n_in, ssa, _finish(n_in, ssa, sets))


def _finish(n_in: int, ssa: list[tuple[int, int]], sets: list[set[int]]) -> list[int]:
    """Append the XORs completing each output; return the SSA value of every output.

    Paar's pairs never cancel terms, but an output is often one or two XORs away from
    values already computed (decoding matrices: 105 -> 83 XORs at n=7), so that is tried
    before summing its remaining terms, cheapest outputs first so later ones can use them.
    """
    masks = [1 << i for i in range(n_in)]
    for a, b in ssa:
        masks.append(masks[a] ^ masks[b])
    known: dict[int, int] = {}
    pairs: dict[int, tuple[int, int]] = {}  # XORs of two known values, while affordable

    def learn(v: int) -> None:
        m = masks[v]
        if m in known:
            return
        if len(known) < CANCEL_MAX_VALUES:
            for m2, v2 in known.items():
                pairs.setdefault(m ^ m2, (v, v2))
        known[m] = v

    def add(a: int, b: int) -> int:
        ssa.append((a, b))
        masks.append(masks[a] ^ masks[b])
        learn(len(masks) - 1)
        return len(masks) - 1

    for v in range(len(masks)):
        learn(v)
    outputs = [0] * len(sets)
    for i in sorted(range(len(sets)), key=lambda i: len(sets[i])):
        terms = sorted(sets[i])
        target = 0
        for t in terms:
            target ^= masks[t]
        value = known.get(target, -1)
        if value < 0 and len(terms) > 2:  # one XOR of two known values?
            value = next(
                (add(v, w) for m, v in known.items() if (w := known.get(target ^ m, -1)) >= 0), -1
            )
        if value < 0 and len(terms) > 3:  # two XORs: a known value and a known pair
            hit = next(((v, p) for m, v in known.items() if (p := pairs.get(target ^ m))), None)
            if hit is not None:
                value = add(hit[0], add(*hit[1]))
        if value < 0:
            value = terms[0]
            for t in terms[1:]:
                value = add(value, t)
        outputs[i] = value
    return outputs


@lru_cache(maxsize=256)
def horner_program(betas: tuple[int, ...], k: int) -> Program:
    """Program computing out_r = sum_j betas[r]**j * in_j, one Horner chain per row."""
    n_in = 8 * k
    ssa: list[tuple[int, int]] = []
    outputs: list[int] = []
    for beta in betas:
        acc = [8 * (k - 1) + bit for bit in range(8)]
        for j in range(k - 2, -1, -1):
            bm = bitmatrix(beta)
            acc = [
                _xor_chain(
                    ssa, [acc[c] for c in range(8) if bm[bit] >> c & 1] + [8 * j + bit], n_in
                )
                for bit in range(8)
            ]
        outputs.extend(acc)
    return _allocate(n_in, ssa, outputs)


def step_words(program: Program, batch: int, words: int) -> int:
    """Packet words per step for `program` over `batch` symbols of `words` packet words.

    The step keeps one step's registers within WORKING_SET bytes, in even steps, a multiple
    of 8 words (64 bytes) unless a packet is shorter.
    """
    regs = program.n_in + program.n_out + program.n_temp
    limit = max(MIN_CHUNK_WORDS, WORKING_SET // (8 * regs * batch))
    steps = -(-words // limit)
    step = -(-words // steps)
    return min(words, -(-step // 8) * 8)


def scratch_words(program: Program, batch: int, step: int) -> int:
    """Size of the scratch `run` needs for this program, batch and step, in uint64 words."""
    return program.n_temp * batch * step


def run(
    program: Program,
    inputs: list[U64Array],
    outputs: list[U64Array],
    chunk_words: int | None = None,
    scratch: U64Array | None = None,
    on_output: Callable[[int], None] | None = None,
) -> None:
    """Execute `program`: each array is (batch, 8*w) uint64, one symbol per batch row.

    Inputs and outputs may be strided along the batch axis; the last axis must be
    contiguous. `chunk_words` overrides the packet words per step (see step_words); `scratch`,
    a 1D uint64 array of at least scratch_words(...), saves an allocation. on_output(t) is
    called as soon as output t is final: mid-run when one step covers the packets, else
    after the last step. Raises ValueError on mismatched shapes.
    """
    if len(inputs) * 8 != program.n_in or len(outputs) * 8 != program.n_out:
        raise ValueError("program and buffer counts disagree")
    shape = inputs[0].shape
    if any(a.shape != shape for a in (*inputs, *outputs)) or shape[1] % 8:
        raise ValueError("symbol buffers must share one shape (batch, 8*w)")
    batch, words = shape
    w = words // 8
    regs = program.n_in + program.n_out + program.n_temp
    whole = 8 * regs * batch * w <= WORKING_SET
    rows = batch if batch > 1 and w >= ROW_BY_ROW_WORDS and not whole else 1
    step = step_words(program, batch // rows, w) if chunk_words is None else chunk_words
    step = max(1, min(w, step))
    need = scratch_words(program, batch // rows, step)
    if scratch is None or len(scratch) < need:
        scratch = np.empty(need, dtype=np.uint64)
    temps = scratch[:need].reshape(program.n_temp, batch // rows, step)
    if rows == 1 and batch > 1:
        _execute(program, [*inputs, *outputs], list(temps), w, step, on_output)
        return
    # One symbol at a time, when the batch would not fit in whole packets but one symbol's
    # packets are long: 1D views, which numpy dispatches at about a third of a 2D call's
    # cost, over whole packets, instead of 2D views over short steps.
    temp_rows = [t[0] for t in temps]
    for b in range(batch):
        arrays = [a[b] for a in (*inputs, *outputs)]
        _execute(program, arrays, temp_rows, w, step, on_output if b == batch - 1 else None)


def _execute(
    program: Program,
    arrays: list[U64Array],
    temps: list[U64Array],
    w: int,
    step: int,
    on_output: Callable[[int], None] | None,
) -> None:
    """Run the ops over `arrays` (inputs then outputs, 8 packets of w words each, along
    the last axis) in steps of `step` words, with `temps` as the temp registers."""
    xor = np.bitwise_xor
    copy = np.bitwise_or  # x | x: a copy with the same call shape as a XOR
    segments = list(zip((0, *program.done[:-1]), program.done, strict=True))
    for c0 in range(0, w, step):
        c1 = min(w, c0 + step)
        regs = [a[..., q * w + c0 : q * w + c1] for a in arrays for q in range(8)]
        regs += [t[..., : c1 - c0] for t in temps]
        bound = [
            (xor, regs[a], regs[b], regs[dst]) if b >= 0 else (copy, regs[a], regs[a], regs[dst])
            for dst, a, b in program.ops
        ]
        for t, (first, last) in enumerate(segments):
            for fn, x, y, z in bound[first:last]:
                fn(x, y, z)
            if on_output is not None and c1 == w:
                on_output(t)
