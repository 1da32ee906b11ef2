#!/usr/bin/env python3
"""Benchmark the Red Stuff codec on one core, against zfec and ISA-L on the same 2D layout.

For n in {4, 7, 10} and blobs of 1, 4 and 16 MiB it measures:
- encode: parity plus commitments (every one of the n*n symbols hashed, roots, metadata);
- parity-only: the two 1D expansions without hashing;
- decode from parity-only primary slivers (the worst case for a reader);
- recovery: rebuilding a lost parity primary sliver from C recovery symbols;
- zfec and pyeclib's ISA-L backend computing the same two expansions (rows of the blob to
  n columns, then all n columns to n rows), copying their output into the matrix as a
  real 2D encoder must.

Figures are MB/s of original blob bytes (recovery: of sliver bytes rebuilt), the median of
several runs. The process is pinned to one CPU. The last line is the headline:
`codec n=7 16MiB: encode X MB/s, parity-only Y MB/s, zfec Z MB/s, isal W MB/s`
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from codec import PRIMARY, Params, Workspace, decode_primaries, encode, expand, rebuild
from codec.recovery import recovery_symbol

MIB = 1 << 20


def timed(fn: Callable[[], object], size: int, runs: int) -> float:
    """Median MB/s of `runs` calls of fn over `size` bytes, after one warm-up call."""
    fn()
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        rates.append(size / (time.perf_counter() - t0) / 1e6)
    return statistics.median(rates)


def layout(params: Params, blob: bytes) -> tuple[np.ndarray, int]:
    s = params.symbol_size(len(blob))
    m = np.zeros((params.n, params.n, s), dtype=np.uint8)
    src = np.frombuffer(blob, dtype=np.uint8)
    row = params.C * s
    for i in range(params.R):
        piece = src[i * row : (i + 1) * row]
        m[i, : params.C].reshape(-1)[: len(piece)] = piece
    return m, s


def zfec_2d(params: Params) -> Callable[[np.ndarray], None] | None:
    try:
        import zfec
    except ImportError:
        return None
    n, r, c = params.n, params.R, params.C
    rows, cols = zfec.Encoder(c, n), zfec.Encoder(r, n)

    def run(m: np.ndarray) -> None:
        for i in range(r):
            out = rows.encode([m[i, j].data for j in range(c)], list(range(c, n)))
            for j, block in zip(range(c, n), out, strict=True):
                m[i, j] = np.frombuffer(block, dtype=np.uint8)
        for j in range(n):
            out = cols.encode([m[i, j].data for i in range(r)], list(range(r, n)))
            for i, block in zip(range(r, n), out, strict=True):
                m[i, j] = np.frombuffer(block, dtype=np.uint8)

    return run


def isal_2d(params: Params) -> Callable[[np.ndarray], None] | None:
    try:
        from pyeclib.ec_iface import ECDriver

        n, r, c = params.n, params.R, params.C
        rows = ECDriver(k=c, m=n - c, ec_type="isa_l_rs_vand")
        cols = ECDriver(k=r, m=n - r, ec_type="isa_l_rs_vand")
    except Exception:  # the backend library may be missing: then no reference figure
        return None
    header = 80  # pyeclib's fragment header; payload follows

    def run(m: np.ndarray) -> None:
        s = m.shape[2]
        for i in range(r):
            frags = rows.encode(m[i, :c].tobytes())
            for j in range(c, n):
                m[i, j] = np.frombuffer(frags[j], dtype=np.uint8, count=s, offset=header)
        for j in range(n):
            frags = cols.encode(m[:r, j].tobytes())
            for i in range(r, n):
                m[i, j] = np.frombuffer(frags[i], dtype=np.uint8, count=s, offset=header)

    return run


def bench(n: int, size: int, runs: int) -> dict[str, float]:
    params = Params.for_nodes(n)
    blob = np.random.default_rng(n * size).integers(0, 256, size, dtype=np.uint8).tobytes()
    ws = Workspace()
    enc = encode(params, blob)
    meta = enc.metadata
    s = meta.symbol_size
    res: dict[str, float] = {}
    res["encode"] = timed(lambda: encode(params, blob, ws), size, runs)
    res["parity"] = timed(lambda: expand(params, blob, ws), size, runs)
    parity_rows = {p.primary.index: bytes(p.primary.data) for p in enc.pairs[params.R :]}
    out = bytearray(params.R * params.C * s)
    assert bytes(decode_primaries(meta, parity_rows, out)) == blob
    res["decode"] = timed(lambda: decode_primaries(meta, parity_rows, out), size, runs)
    target = params.n - 1  # a parity primary: no stored copy of its symbols anywhere
    secondaries = {p.secondary.index: p.secondary for p in enc.pairs}
    symbols = {j: recovery_symbol(meta, secondaries[j], target) for j in range(params.C)}
    assert rebuild(meta, PRIMARY, target, symbols).data == bytes(enc.pairs[target].primary.data)
    res["recover"] = timed(lambda: rebuild(meta, PRIMARY, target, symbols), params.C * s, runs)
    m, _ = layout(params, blob)
    for name, make in (("zfec", zfec_2d), ("isal", isal_2d)):
        fn = make(params)
        if fn is not None:
            fn(m)
            assert np.array_equal(
                m[: params.R, : params.C], expand(params, blob)[: params.R, : params.C]
            )
            res[name] = timed(lambda fn=fn: fn(m), size, runs)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="n=7 16MiB only")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    cases = [(7, 16)] if args.quick else [(n, mib) for n in (4, 7, 10) for mib in (1, 4, 16)]
    print(f"one core (cpu {cpus[-1]}), median of {args.runs} runs, MB/s")
    print(
        f"{'case':>12} {'encode':>8} {'parity':>8} {'decode':>8} {'recover':>8} {'zfec':>8} {'isal':>8}"
    )
    results = {}
    for n, mib in cases:
        r = bench(n, mib * MIB, args.runs)
        results[(n, mib)] = r
        cols = " ".join(
            f"{r.get(k, float('nan')):8.0f}"
            for k in ("encode", "parity", "decode", "recover", "zfec", "isal")
        )
        print(f"{f'n={n} {mib}MiB':>12} {cols}", flush=True)
    r = results[(7, 16)]
    print(
        f"codec n=7 16MiB: encode {r['encode']:.0f} MB/s, parity-only {r['parity']:.0f} MB/s, "
        f"zfec {r.get('zfec', float('nan')):.0f} MB/s, isal {r.get('isal', float('nan')):.0f} MB/s"
    )


if __name__ == "__main__":
    main()
