"""`walrusfs demo --codec`: show Red Stuff at work on one sample blob.

Encodes a blob for 7 nodes, loses f of them, decodes from what is left, catches a flipped
bit, and rebuilds a lost sliver from one symbol of each of the others. No I/O beyond
printing.
"""

from __future__ import annotations

import random

from codec import (
    PRIMARY,
    SECONDARY,
    Params,
    VerificationError,
    decode_primaries,
    decode_secondaries,
    encode,
    rebuild,
    recovery_symbol,
    verify_sliver,
)


def main() -> int:
    params = Params.for_nodes(7)
    rng = random.Random(7)
    blob = b"".join(f"line {i}: walrus stores what you give it\n".encode() for i in range(20000))
    enc = encode(params, blob)
    meta = enc.metadata
    print(
        f"blob of {len(blob):,} bytes, n={params.n} nodes, f={params.f}: R={params.R} rows, C={params.C} columns"
    )
    print(f"blob id {meta.blob_id.hex()}")
    print(
        f"symbol {meta.symbol_size:,} B; each node stores {params.R + params.C} symbols; "
        f"{params.n * (params.R + params.C) / (params.R * params.C):.2f}x the blob in all"
    )
    lost = set(rng.sample(range(params.n), params.f))
    alive = [p for p in enc.pairs if meta.node_of_pair(p.pair) not in lost]
    print(f"nodes {sorted(lost)} are gone")
    prim = {p.primary.index: p.primary for p in alive}
    sec = {p.secondary.index: p.secondary for p in alive}
    for s in (*prim.values(), *sec.values()):
        verify_sliver(meta, s)
    by_primary = decode_primaries(meta, {i: prim[i].data for i in list(prim)[: params.R]})
    by_secondary = decode_secondaries(meta, {j: sec[j].data for j in list(sec)[: params.C]})
    print(
        f"decoded from {params.R} primary slivers: {'ok' if bytes(by_primary) == blob else 'WRONG'}"
    )
    print(
        f"decoded from {params.C} secondary slivers: {'ok' if bytes(by_secondary) == blob else 'WRONG'}"
    )
    victim = alive[0].primary
    flipped = bytearray(victim.data)
    flipped[12345 % len(flipped)] ^= 0x10
    try:
        verify_sliver(meta, type(victim)(PRIMARY, victim.index, bytes(flipped), victim.leaves))
        print("a flipped bit went unnoticed: WRONG")
    except VerificationError as exc:
        print(f"a flipped bit is caught: {exc}")
    target = next(p for p in enc.pairs if meta.node_of_pair(p.pair) in lost)
    symbols = {
        j: recovery_symbol(meta, sec[j], target.primary.index) for j in list(sec)[: params.C]
    }
    rebuilt = rebuild(meta, PRIMARY, target.primary.index, symbols)
    ok = bytes(rebuilt.data) == bytes(target.primary.data)
    print(
        f"lost primary sliver {target.primary.index} rebuilt from {params.C} symbols "
        f"({params.C * meta.symbol_size:,} B read): {'ok' if ok else 'WRONG'}"
    )
    symbols = {
        i: recovery_symbol(meta, prim[i], target.secondary.index) for i in list(prim)[: params.R]
    }
    rebuilt2 = rebuild(meta, SECONDARY, target.secondary.index, symbols)
    ok2 = bytes(rebuilt2.data) == bytes(target.secondary.data)
    print(
        f"lost secondary sliver {target.secondary.index} rebuilt from {params.R} symbols: {'ok' if ok2 else 'WRONG'}"
    )
    return 0 if ok and ok2 and bytes(by_primary) == blob else 1


if __name__ == "__main__":
    raise SystemExit(main())
