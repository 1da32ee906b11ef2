"""GF(2^8), the chosen codes and the XOR programs, checked against an independent model."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from codec import Params, encode, expand, expansion, gf256, rowcode, xorsched
from codec.codes import generator, horner_betas, parity_matrix, parity_program, solve_program
from codec.errors import ParameterError
from codec.xorsched import matrix_program, run
from tests.codec import reference


def test_field_matches_reference_tables() -> None:
    for a in range(256):
        for b in range(0, 256, 7):
            assert gf256.mul(a, b) == reference.MUL[a, b]
    for a in range(1, 256):
        assert gf256.mul(a, gf256.inv(a)) == 1
    with pytest.raises(ZeroDivisionError):
        gf256.inv(0)


def test_bitmatrix_is_multiplication() -> None:
    for e in range(256):
        rows = gf256.bitmatrix(e)
        for x in (1, 2, 0x80, 0x5A, 0xFF):
            y = sum((bin(rows[i] & x).count("1") & 1) << i for i in range(8))
            assert y == gf256.mul(e, x)


def test_matrix_inverse() -> None:
    rng = random.Random(3)
    for k in (1, 2, 5):
        while True:
            m = tuple(tuple(rng.randrange(256) for _ in range(k)) for _ in range(k))
            try:
                inv = gf256.mat_inv(m)
                break
            except ValueError:
                continue
        ident = tuple(tuple(int(i == j) for j in range(k)) for i in range(k))
        assert gf256.mat_mul(m, inv) == ident


@pytest.mark.parametrize("n", range(4, 14))
def test_every_k_rows_of_each_generator_are_invertible(n: int) -> None:
    """MDS: any k of the n codeword positions determine the rest, for both codes."""
    for f in range(1, (n - 1) // 3 + 1):
        for k in (n - 2 * f, n - f):
            g = generator(n, k)
            subsets = list(itertools.combinations(range(n), k))
            for rows in random.Random(n * 31 + k).sample(subsets, min(len(subsets), 200)):
                gf256.mat_inv(tuple(g[i] for i in rows))


def test_horner_codes_are_used_for_small_n_and_cauchy_for_large() -> None:
    assert horner_betas(7, 3) == (1, 2, 142, 4)
    assert horner_betas(7, 5) == (1, 2)
    assert horner_betas(40, 14) is None
    assert parity_matrix(40, 14)[0] == (1,) * 14  # normalised Cauchy: XOR parity first


def test_code_parameters_out_of_range() -> None:
    with pytest.raises(ParameterError):
        parity_matrix(4, 4)
    with pytest.raises(ParameterError):
        parity_matrix(300, 10)
    with pytest.raises(ParameterError):
        solve_program(7, 3, (0, 0, 1), (2,))


def _symbols(rng: np.random.Generator, count: int, s: int) -> list[bytes]:
    return [rng.integers(0, 256, s, dtype=np.uint8).tobytes() for _ in range(count)]


def _run(program_inputs: list[bytes], n_out: int, program, s: int) -> list[bytes]:
    ins = [np.frombuffer(x, dtype=np.uint64).reshape(1, -1).copy() for x in program_inputs]
    outs = [np.empty((1, s // 8), dtype=np.uint64) for _ in range(n_out)]
    run(program, ins, outs, chunk_words=3)  # tiny chunks exercise the chunk loop too
    return [o.tobytes() for o in outs]


@pytest.mark.parametrize(("n", "k"), [(4, 2), (7, 3), (7, 5), (10, 4), (13, 9), (20, 8)])
def test_parity_programs_match_the_reference(n: int, k: int) -> None:
    rng = np.random.default_rng(n * 100 + k)
    s = 128
    src = _symbols(rng, k, s)
    expected = reference.apply(parity_matrix(n, k), src)
    assert _run(src, n - k, parity_program(n, k), s) == expected


def test_dense_matrix_program_matches_the_reference() -> None:
    rng = np.random.default_rng(5)
    py = random.Random(5)
    for rows, cols in [(1, 1), (3, 3), (2, 7), (6, 4)]:
        m = tuple(tuple(py.randrange(1, 256) for _ in range(cols)) for _ in range(rows))
        src = _symbols(rng, cols, 64)
        assert _run(src, rows, matrix_program(m), 64) == reference.apply(m, src)


def test_run_rejects_mismatched_buffers() -> None:
    prog = parity_program(7, 3)
    a = np.zeros((1, 8), dtype=np.uint64)
    with pytest.raises(ValueError):
        run(prog, [a, a], [a] * 4)
    with pytest.raises(ValueError):
        run(prog, [a, a, np.zeros((1, 16), dtype=np.uint64)], [a] * 4)


@pytest.mark.parametrize(("n", "f"), [(4, 1), (7, 2), (10, 3), (13, 4), (15, 4)])
def test_row_code_accumulated_column_by_column_matches_the_reference(n: int, f: int) -> None:
    k, r = n - f, n - 2 * f
    exps = rowcode.exponents(n, k)
    assert exps is not None
    rng = np.random.default_rng(n)
    s = 192
    blob = [_symbols(rng, k, s) for _ in range(r)]
    accs = [np.empty((r, 8, s // 64), dtype=np.uint64) for _ in exps]
    rows = rowcode.RowAccumulator(exps, k, accs)
    for j in range(k - 1, -1, -1):
        column = np.array([np.frombuffer(blob[i][j], dtype=np.uint64) for i in range(r)])
        rows.add(j, column.reshape(r, 8, -1))
    with pytest.raises(ValueError):
        rows.add(0, accs[0])
    for i in range(r):
        assert [acc[i].tobytes() for acc in accs] == reference.apply(parity_matrix(n, k), blob[i])


@pytest.mark.parametrize(("n", "f", "length"), [(7, 2, 5000), (16, 5, 3000)])
def test_expanded_matrix_is_the_product_code(n: int, f: int, length: int) -> None:
    """Rows are codewords of the [n, C] code and columns of the [n, R] code.

    n=16 takes the paths for codes the row accumulator cannot do: its row code runs after
    the loop, and its column code is a Cauchy matrix.
    """
    params = Params(n, f)
    r, c = params.R, params.C
    assert (rowcode.exponents(n, c) is None) == (n >= 16)
    blob = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    m = expand(params, blob)
    s = m.shape[2]
    padded = blob + bytes(r * c * s - length)
    for i in range(r):
        assert m[i, :c].tobytes() == padded[i * c * s : (i + 1) * c * s]
    for i in range(n):
        row = [m[i, j].tobytes() for j in range(c)]
        assert [m[i, j].tobytes() for j in range(c, n)] == reference.apply(parity_matrix(n, c), row)
    for j in range(n):
        col = [m[i, j].tobytes() for i in range(r)]
        assert [m[i, j].tobytes() for i in range(r, n)] == reference.apply(parity_matrix(n, r), col)


@pytest.mark.parametrize(("n", "f"), [(4, 1), (7, 2), (10, 3), (16, 5)])
@pytest.mark.parametrize("columns", [1, 2, 3])
def test_every_expansion_order_gives_the_same_encoding(
    n: int, f: int, columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big blobs stream column batch by column batch; small ones go rows first. Same bytes."""
    params = Params(n, f)
    blob = np.random.default_rng(n * columns).integers(0, 256, 9000, dtype=np.uint8).tobytes()
    in_cache, matrix = encode(params, blob), expand(params, blob).copy()
    s = params.symbol_size(len(blob))
    monkeypatch.setattr(expansion, "BATCH_BYTES", columns * n * s)
    monkeypatch.setattr(expansion, "IN_CACHE_BYTES", 0)
    assert expansion.batch_columns(params, s) == columns
    streamed = encode(params, blob)
    assert streamed.metadata == in_cache.metadata
    for a, b in zip(streamed.pairs, in_cache.pairs, strict=True):
        for x, y in ((a.primary, b.primary), (a.secondary, b.secondary)):
            assert bytes(x.data) == bytes(y.data) and x.leaves == y.leaves
    assert np.array_equal(expand(params, blob), matrix)


@pytest.mark.parametrize("row_by_row", [False, True])
@pytest.mark.parametrize("chunk_words", [None, 3])
def test_batches_run_whole_or_row_by_row_and_report_finished_outputs(
    row_by_row: bool, chunk_words: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if row_by_row:  # as if packets were long and the batch too big for whole packets
        monkeypatch.setattr(xorsched, "ROW_BY_ROW_WORDS", 1)
        monkeypatch.setattr(xorsched, "WORKING_SET", 0)
    rng = np.random.default_rng(11)
    s, batch = 256, 3
    src = [_symbols(rng, 3, s) for _ in range(batch)]
    ins = [
        np.array([np.frombuffer(src[b][i], dtype=np.uint64) for b in range(batch)])
        for i in range(3)
    ]
    outs = [np.zeros((batch, s // 8), dtype=np.uint64) for _ in range(4)]
    expected = [reference.apply(parity_matrix(7, 3), src[b]) for b in range(batch)]
    seen = []

    def finished(t: int) -> None:  # output t must be final for every symbol of the batch
        assert [outs[t][b].tobytes() for b in range(batch)] == [e[t] for e in expected]
        seen.append(t)

    run(parity_program(7, 3), ins, outs, chunk_words, on_output=finished)
    assert seen == [0, 1, 2, 3]


@pytest.mark.parametrize("in_cache", [True, False])
def test_slivers_never_view_the_blob(in_cache: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not in_cache:
        monkeypatch.setattr(expansion, "IN_CACHE_BYTES", 0)
        monkeypatch.setattr(expansion, "BATCH_BYTES", 0)
    params = Params.for_nodes(7)
    raw = np.random.default_rng(3).integers(0, 256, 15 * 64 * 3, dtype=np.uint8).tobytes()
    want = encode(params, raw)
    for blob in (bytearray(raw), memoryview(bytearray(raw))):
        got = encode(params, blob)
        blob[:] = bytes(len(raw))  # the caller reuses its buffer
        assert got.metadata == want.metadata
        for a, b in zip(got.pairs, want.pairs, strict=True):
            assert bytes(a.primary.data) == bytes(b.primary.data)
            assert bytes(a.secondary.data) == bytes(b.secondary.data)
