"""The leftovers plugin, in pytest runs of their own under a temporary root of their own."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.leftovers import mounts_under
from tests.walrusfs.silentmount import silent_mount

ROOT = Path(__file__).resolve().parents[1]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="only root may mount(2) by hand")


def run_pytest(temproot: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(temproot)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@ROOT_ONLY
def test_a_dead_mount_left_by_a_killed_run_does_not_fail_a_later_run(tmp_path: Path) -> None:
    runs = tmp_path / f"pytest-of-{getpass.getuser()}"
    point = runs / "pytest-0" / "test_x0" / "node"
    point.mkdir(parents=True)
    for number in (1, 2, 3):  # the next run is the fourth after it: pytest removes pytest-0
        (runs / f"pytest-{number}").mkdir()
    with silent_mount(point) as mount:
        mount.end()  # its server is gone; nobody unmounted it
        ran = run_pytest(tmp_path, "tests/codec/test_format.py")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert mounts_under(tmp_path) == []
        assert not (runs / "pytest-0").exists()


@ROOT_ONLY
def test_a_live_run_keeps_its_mounts(tmp_path: Path) -> None:
    runs = tmp_path / f"pytest-of-{getpass.getuser()}"
    point = runs / "pytest-0" / "test_x0" / "node"
    point.mkdir(parents=True)
    (runs / "pytest-0" / ".lock").write_text(str(os.getpid()))  # this pytest holds it
    with silent_mount(point) as mount:
        mount.end()
        ran = run_pytest(tmp_path, "tests/codec/test_format.py")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert [p for p, _, _ in mounts_under(tmp_path)] == [str(point)]


@ROOT_ONLY
def test_a_test_that_leaves_a_mount_fails_the_run_and_the_mount_goes(tmp_path: Path) -> None:
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "test_leaky.py").write_text(
        "from tests.walrusfs.silentmount import silent_mount\n"
        "LEAKED = []\n"
        "def test_leak(tmp_path):\n"
        "    (tmp_path / 'node').mkdir()\n"
        "    LEAKED.append(silent_mount(tmp_path / 'node'))\n"
        "    LEAKED[0].__enter__()  # and never left\n"
    )
    ran = run_pytest(tmp_path, "-p", "tests.leftovers", "--rootdir", str(ROOT), str(leaky))
    assert ran.returncode != 0
    assert "the tests left mounts behind" in ran.stdout and "test_leak0/node" in ran.stdout
    assert mounts_under(tmp_path) == []
