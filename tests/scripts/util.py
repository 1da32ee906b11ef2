"""Helpers for the fault-script tests: run a script as a user would, volumes, cleanup.

The scripts run as real subprocesses (never imported: nothing imports scripts). Cleanup
reads /proc/self/mountinfo itself rather than trusting the scripts under test, and only
ever touches mounts below the test's own directory and processes the scripts recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from codec import BlobMetadata
from tests.leftovers import detach, mounts_under
from walrusfs.blobstore import PutResult
from walrusfs.volume import Volume, create_volume, open_volume

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
BADMOUNT_RUN_DIR = Path("/run/badmount")
N, F = 7, 2  # R = 3 systematic primaries, C = 5
BLOB_SIZE = 1 << 16
DATA_SIZE = 50_000
# "Well before the deadline": generous, CI machines are noisy; a real hang takes forever.
BOUND = 20.0
SCRIPT_DEADLINE = 120.0


@dataclass
class Ran:
    """A finished script run."""

    rc: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.out)
        return doc


async def script(name: str, *args: object, ok: bool = True) -> Ran:
    """Run scripts/<name> with the test's interpreter; insist on exit 0 unless ok=False.

    Every script run is bounded: a script that hangs fails the test instead of stalling it.
    """
    cmd = [sys.executable, str(SCRIPTS / name), *(str(a) for a in args)]
    with trio.fail_after(SCRIPT_DEADLINE):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    ran = Ran(done.returncode, done.stdout.decode(), done.stderr.decode())
    if ok and ran.rc != 0:
        raise AssertionError(f"{' '.join(cmd[1:])} exited {ran.rc}:\n{ran.err}\n{ran.out}")
    return ran


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until `check()` holds, well before BOUND (it watches another process, so no
    trio event can tell us)."""
    with trio.fail_after(BOUND):
        while not await check():  # noqa: ASYNC110 - polling another process's state
            await trio.sleep(0.05)


def node_paths(base: Path, n: int = N) -> list[Path]:
    return [base / f"n{i}" for i in range(n)]


async def make_volume(paths: list[Path]) -> None:
    await create_volume([str(p) for p in paths], f=F, blob_size=BLOB_SIZE)


async def open_vol(paths: list[Path], **opts: float) -> Volume:
    """Open from a node that is not being faulted (index 0 is never the faulted one here)."""
    return await open_volume(str(paths[0]), None, **opts)


def blob_data(count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(DATA_SIZE) for _ in range(count)]


async def put_all(vol: Volume, datas: list[bytes]) -> list[PutResult]:
    return [await vol.blobs.put_blob(d) for d in datas]


async def assert_all_readable(vol: Volume, puts: list[PutResult], datas: list[bytes]) -> None:
    for r, d in zip(puts, datas, strict=True):
        with trio.fail_after(BOUND):
            got = await vol.blobs.get_blob(r.blob_id, r.meta)
        assert bytes(got) == d


async def puts_touching(vol: Volume, k: int, count: int) -> tuple[list[PutResult], list[bytes]]:
    """Put blobs until `count` of them have a systematic primary sliver on node `k`.

    Healthy reads of those blobs use node k, so surviving a fault of k is not luck.
    """
    puts, datas = [], []
    for d in blob_data(60, seed=5):
        r = await vol.blobs.put_blob(d)
        if k in systematic_nodes(r):
            puts.append(r)
            datas.append(d)
            if len(puts) == count:
                return puts, datas
    raise AssertionError(f"no blob with a systematic sliver on node {k}")


def node_of_pair(r: PutResult, pair: int) -> int:
    return BlobMetadata.from_bytes(r.meta).node_of_pair(pair)


def systematic_nodes(r: PutResult) -> set[int]:
    """The nodes a healthy get_blob reads: those of primary slivers 0..R-1."""
    return {node_of_pair(r, p) for p in range(N - 2 * F)}


def state_of(vol: Volume, index: int) -> str:
    return str(vol.nodes.snapshot()[index]["state"])


def sliver_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.p*") if p.is_file() and re.search(r"\.p\d+$", p.name))


# -- cleanup --------------------------------------------------------------------------------


def is_mounted(point: Path) -> bool:
    return any(p == str(point) for p, _, _ in mounts_under(point))


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def cleanup(prefix: Path) -> list[str]:
    """Leave nothing behind below `prefix`: badmount servers, sshfs nodes, any mount.

    Returns what had to be cleaned (empty when the test cleaned up after itself).
    """
    done: list[str] = []
    # badmount servers the test left running: release hung requests, unmount, stop.
    for rec_path in BADMOUNT_RUN_DIR.glob("*.json") if BADMOUNT_RUN_DIR.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(rec_path.read_text())
            if str(rec.get("mountpoint", "")).startswith(str(prefix)):
                subprocess.run(
                    [sys.executable, str(SCRIPTS / "badmount.py"), "unmount", rec["mountpoint"]],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
                if _same_process(rec):
                    _kill(int(rec["pid"]))
                done.append(f"badmount {rec['mountpoint']}")
    # sshfs nodes: their records sit beside the node directories.
    for rec_path in prefix.rglob(".walrusfs-sshfs-*.json"):
        rec = json.loads(rec_path.read_text())
        subprocess.run(
            [sys.executable, str(SCRIPTS / "sshfs_node.py"), "down", rec["node"]],
            capture_output=True,
            timeout=60,
            check=False,
        )
        for kind in ("sshd", "sshfs"):
            pid, started = rec.get(f"{kind}_pid"), rec.get(f"{kind}_start")
            if pid and _same_process({"pid": pid, "start_time": started}):
                _kill(pid)
        done.append(f"sshfs node {rec['node']}")
    # Anything still mounted: detach it, and abort FUSE connections so no thread stays stuck.
    done += detach(prefix)
    return done


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def _same_process(rec: dict[str, Any]) -> bool:
    try:
        with open(f"/proc/{int(rec['pid'])}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return rec.get("start_time") is None or int(fields[19]) == int(rec["start_time"])
