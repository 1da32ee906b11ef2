"""The chaos run as a user runs it: a short, seeded one is part of the test suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")
def test_a_short_chaos_run_loses_nothing() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--seconds", "40", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"chaos: ops (\d+), faults (\d+), crashes (\d+), verified (\d+) bytes, mismatches (\d+), late ops (\d+), repaired in ([\d.]+) s",
        last,
    )
    assert m, res.stdout[-3000:] + res.stderr[-3000:]
    ops, faults, crashes, verified, mismatches, late = (int(x) for x in m.groups()[:6])
    assert mismatches == 0 and late == 0, res.stdout[-3000:]
    # The first crash comes within 1.5x --crash-every (15 s by default) of the start.
    assert ops > 50 and faults > 3 and crashes >= 1 and verified > 0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
