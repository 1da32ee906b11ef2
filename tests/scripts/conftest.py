"""Fixtures for the fault-script tests: a place below which nothing may be left behind.

Every test of this package works below its own `tmp_path`; the autouse `no_leftovers`
fixture runs after everything else (also when the test failed) and removes whatever is
still mounted or running there, so a failing test cannot leave a hung mount behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scripts.util import cleanup


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    yield
    cleanup(tmp_path)


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts)")
