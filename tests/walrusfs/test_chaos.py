"""The chaos run as a user runs it: a short, seeded one is part of the test suite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.walrusfs.soakrun import run_soak


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")
def test_a_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    rc, out, err = run_soak("chaos.py", "--seconds", "40", "--seed", "7", workdir=tmp_path)
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(
        r"chaos: ops (\d+), faults (\d+), crashes (\d+), verified (\d+) bytes, mismatches (\d+), late ops (\d+), repaired in ([\d.]+) s",
        last,
    )
    assert m, out[-3000:] + err[-3000:]
    ops, faults, crashes, verified, mismatches, late = (int(x) for x in m.groups()[:6])
    assert mismatches == 0 and late == 0, out[-3000:]
    # The first crash comes within 1.5x --crash-every (15 s by default) of the start.
    assert ops > 50 and faults > 3 and crashes >= 1 and verified > 0
    assert rc == 0, out[-3000:] + err[-3000:]
