"""Property tests: every erasure pattern within the bound decodes and recovers; beyond, a clean error."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec import (
    PRIMARY,
    SECONDARY,
    InconsistentEncoding,
    NotEnoughSlivers,
    Params,
    VerificationError,
    decode_primaries,
    decode_secondaries,
    encode,
    is_stored,
    range_plan,
    rebuild,
    recovery_symbol,
    verify_sliver,
)


@st.composite
def volumes(draw: st.DrawFn) -> tuple[Params, bytes, random.Random]:
    n = draw(st.integers(4, 13))
    f = draw(st.integers(1, (n - 1) // 3))
    length = draw(st.one_of(st.integers(0, 70), st.integers(0, 6000)))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    return Params(n, f), rng.randbytes(length), rng


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _slivers(enc):  # type: ignore[no-untyped-def]
    prim = {pr.primary.index: pr.primary for pr in enc.pairs}
    sec = {pr.secondary.index: pr.secondary for pr in enc.pairs}
    return prim, sec


@SETTINGS
@given(volumes())
def test_any_r_primaries_or_c_secondaries_decode(vol: tuple[Params, bytes, random.Random]) -> None:
    params, blob, rng = vol
    enc = encode(params, blob)
    prim, sec = _slivers(enc)
    for sliver in (*prim.values(), *sec.values()):
        verify_sliver(enc.metadata, sliver)
    keep = rng.sample(range(params.n), params.R)
    assert bytes(decode_primaries(enc.metadata, {i: prim[i].data for i in keep})) == blob
    keep = rng.sample(range(params.n), params.C)
    assert bytes(decode_secondaries(enc.metadata, {i: sec[i].data for i in keep})) == blob
    with pytest.raises(NotEnoughSlivers):
        decode_primaries(enc.metadata, {i: prim[i].data for i in keep[: params.R - 1]})
    with pytest.raises(NotEnoughSlivers):
        decode_secondaries(enc.metadata, {i: sec[i].data for i in keep[: params.C - 1]})


@SETTINGS
@given(volumes())
def test_any_lost_sliver_is_rebuilt_from_k_symbols(
    vol: tuple[Params, bytes, random.Random],
) -> None:
    params, blob, rng = vol
    enc = encode(params, blob)
    prim, sec = _slivers(enc)
    target = rng.randrange(params.n)
    sources = rng.sample([j for j in range(params.n) if j != params.n - 1 - target], params.C)
    symbols = {j: recovery_symbol(enc.metadata, sec[j], target) for j in sources}
    got = rebuild(enc.metadata, PRIMARY, target, symbols)
    assert bytes(got.data) == bytes(prim[target].data)
    assert got.leaves == prim[target].leaves
    sources = rng.sample([i for i in range(params.n) if i != params.n - 1 - target], params.R)
    symbols = {i: recovery_symbol(enc.metadata, prim[i], target) for i in sources}
    got = rebuild(enc.metadata, SECONDARY, target, symbols)
    assert bytes(got.data) == bytes(sec[target].data)
    with pytest.raises(NotEnoughSlivers):
        rebuild(enc.metadata, SECONDARY, target, dict(list(symbols.items())[:-1]))


@SETTINGS
@given(volumes())
def test_a_bad_recovery_symbol_is_reported_not_written(
    vol: tuple[Params, bytes, random.Random],
) -> None:
    params, blob, rng = vol
    enc = encode(params, blob)
    _, sec = _slivers(enc)
    target = rng.randrange(params.n)
    sources = rng.sample(range(params.n), params.C)
    symbols = {j: bytearray(recovery_symbol(enc.metadata, sec[j], target)) for j in sources}
    victim = rng.choice(sources)
    symbols[victim][rng.randrange(len(symbols[victim]))] ^= 1 << rng.randrange(8)
    with pytest.raises(InconsistentEncoding):
        rebuild(enc.metadata, PRIMARY, target, symbols)


@SETTINGS
@given(volumes(), st.data())
def test_a_flipped_byte_anywhere_is_detected_and_attributed(
    vol: tuple[Params, bytes, random.Random], data: st.DataObject
) -> None:
    params, blob, rng = vol
    enc = encode(params, blob)
    pair = enc.pairs[rng.randrange(params.n)]
    sliver = rng.choice([pair.primary, pair.secondary])
    field = data.draw(st.sampled_from(["data", "leaves"]))
    raw = bytearray(getattr(sliver, field))
    raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    bad = type(sliver)(**{**sliver.__dict__, field: bytes(raw)})
    with pytest.raises(VerificationError) as err:
        verify_sliver(enc.metadata, bad)
    assert err.value.sliver == (sliver.axis, sliver.index)


def test_every_single_byte_corruption_is_detected_exhaustively() -> None:
    params = Params.for_nodes(4)
    enc = encode(params, bytes(range(256)) * 2)
    for pair in enc.pairs:
        for sliver in (pair.primary, pair.secondary):
            for field in ("data", "leaves"):
                raw = bytes(getattr(sliver, field))
                for pos in range(len(raw)):
                    bad = bytearray(raw)
                    bad[pos] ^= 0x40
                    with pytest.raises(VerificationError):
                        verify_sliver(
                            enc.metadata, type(sliver)(**{**sliver.__dict__, field: bytes(bad)})
                        )


def test_wrong_sizes_are_refused() -> None:
    params = Params.for_nodes(7)
    enc = encode(params, b"x" * 1000)
    prim, _ = _slivers(enc)
    short = type(prim[0])(PRIMARY, 0, bytes(prim[0].data)[:-64], prim[0].leaves)
    with pytest.raises(VerificationError):
        verify_sliver(enc.metadata, short)
    with pytest.raises(ValueError):
        decode_primaries(enc.metadata, {0: b"x", 1: prim[1].data, 2: prim[2].data})


@SETTINGS
@given(volumes(), st.data())
def test_byte_ranges_come_from_the_systematic_slivers_holding_them(
    vol: tuple[Params, bytes, random.Random], data: st.DataObject
) -> None:
    params, blob, _ = vol
    enc = encode(params, blob)
    prim, _ = _slivers(enc)
    offset = data.draw(st.integers(0, len(blob) + 10))
    length = data.draw(st.integers(0, len(blob) + 10))
    out = bytearray()
    for piece in range_plan(enc.metadata, offset, length):
        assert piece.sliver < params.R  # only systematic primaries are read
        assert piece.blob_offset == offset + len(out)
        out += bytes(prim[piece.sliver].data)[piece.start : piece.stop]
    assert bytes(out) == blob[offset : offset + length]


def test_stored_symbols_are_where_the_layout_says() -> None:
    params = Params.for_nodes(7)
    enc = encode(params, bytes(range(200)) * 50)
    prim, sec = _slivers(enc)
    s = enc.metadata.symbol_size
    for target in range(params.n):
        assert is_stored(enc.metadata, SECONDARY, target) == (target < params.R)
        assert is_stored(enc.metadata, PRIMARY, target) == (target < params.C)
        # M[target][j] from secondary j equals position j of the primary's full row.
        for j in range(params.C):
            assert (
                recovery_symbol(enc.metadata, sec[j], target)
                == bytes(prim[target].data)[j * s : (j + 1) * s]
            )
