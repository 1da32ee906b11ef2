"""fsck: check an unmounted volume from its node directories, and heal it with --repair.

`walrusfs fsck NODE_DIR [--repair]` opens the volume NODE_DIR belongs to, recovers the
metadata from the nodes into a temporary directory (checkpoint + journal replay, as a
mount would, but writing nothing to the nodes), then checks:

* every sliver file every node should hold exists and verifies (header, size, leaves,
  every symbol: scrub.verify_file); a blob is decodable iff R of its primary slivers or C
  of its secondary slivers verify (a corrupt file may still hold one whole sliver);
* orphans: sliver files of blobs nothing references (checkpoint blobs are referenced);
* refcounts: blobs.refcount against the blocks rows naming each blob, and blocks rows
  naming a blob the blobs table lacks.

With --repair it takes the mount lock (so no mount runs meanwhile), rebuilds every
missing or corrupt pair of every decodable blob (repair.RepairEngine), removes orphans and
stale temp files. Refcounts live in the metadata journal and are only reported.

Exit codes: 0 clean (or everything found was repaired), 1 damage remains but no data is
lost, 2 data lost (undecodable blobs; the affected file paths are printed), 4 the check
could not run (volume unopenable, mounted, metadata unrecoverable).

Must not import pyfuse3. Runs in one trio run; `main` is the plain entry point.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
from typing import TextIO

import trio

from backends import NodeError
from codec import PRIMARY, SECONDARY
from walrusfs.catalog import BlobRef, Catalog
from walrusfs.checkpoint import RecoveryError, Superblock, read_superblock
from walrusfs.errors import StorageUnavailable
from walrusfs.lock import LOCK_KEY, LockRecord, MountLock, MountLockError
from walrusfs.metadata import ROOT_INODE, read_only
from walrusfs.recovery import recover
from walrusfs.repair import RepairEngine
from walrusfs.scrub import Finding, NodeSweep, remove_stale_temps, sweep_node
from walrusfs.sliverfile import file_size
from walrusfs.volume import Volume, VolumeError, open_volume

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_LOST = 2
EXIT_ERROR = 4

MiB = 1 << 20


class _Progress:
    """A one-line progress bar, drawn only when `out` is a terminal."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out, self.total, self.done = out, max(total, 1), 0
        self.tty = out.isatty()
        self._last = -1

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        percent = min(100, self.done * 100 // self.total)
        if self.tty and percent != self._last:
            self._last = percent
            bar = "#" * (percent // 4)
            self.out.write(f"\r  verifying [{bar:<25}] {percent:3d}%")
            self.out.flush()

    def end(self) -> None:
        if self.tty and self._last >= 0:
            self.out.write("\r" + " " * 44 + "\r")
            self.out.flush()


def _paths(db: sqlite3.Connection, ino: int, depth: int = 0) -> list[str]:
    """Every path naming inode `ino` (hard links give several)."""
    if ino == ROOT_INODE:
        return [""]
    rows = db.execute("SELECT parent, name FROM dentries WHERE inode = ?", (ino,)).fetchall()
    if not rows or depth > 256:
        return [f"<unlinked inode {ino}>"]
    return [
        f"{parent_path}/{os.fsdecode(bytes(name))}"
        for parent, name in rows
        for parent_path in _paths(db, parent, depth + 1)
    ]


def affected_paths(db_path: str, blob_ids: list[bytes]) -> dict[bytes, list[str]]:
    """The file paths whose data lies in each blob (blocking)."""
    db = read_only(db_path)
    try:
        found: dict[bytes, list[str]] = {}
        for blob_id in blob_ids:
            inodes = db.execute(
                "SELECT DISTINCT inode FROM blocks WHERE blob_id = ?", (blob_id,)
            ).fetchall()
            found[blob_id] = sorted(p for (ino,) in inodes for p in _paths(db, ino))
        return found
    finally:
        db.close()


def refcount_problems(db_path: str) -> list[str]:
    """blobs.refcount against the blocks rows, and blocks naming no blob row (blocking)."""
    db = read_only(db_path)
    try:
        problems = [
            f"blob {bytes(b).hex()[:16]}: refcount {rc}, but {count} blocks name it"
            for b, rc, count in db.execute(
                "SELECT b.blob_id, b.refcount, COUNT(k.blob_id) FROM blobs b "
                "LEFT JOIN blocks k ON k.blob_id = b.blob_id "
                "GROUP BY b.blob_id HAVING b.refcount != COUNT(k.blob_id)"
            )
        ]
        for (b,) in db.execute(
            "SELECT DISTINCT blob_id FROM blocks WHERE blob_id NOT IN (SELECT blob_id FROM blobs)"
        ):
            paths = affected_paths(db_path, [bytes(b)])[bytes(b)]
            problems.append(
                f"blob {bytes(b).hex()[:16]}: named by {', '.join(paths)} but has no blob record"
            )
        return problems
    finally:
        db.close()


async def _mounted_by(vol: Volume) -> str | None:
    """Who holds a live mount lock on the volume, if anyone."""
    holders: list[str] = []

    async def one(i: int) -> None:
        try:
            rec = LockRecord.from_bytes(await vol.nodes.call(i, lambda st: st.get(LOCK_KEY)))
        except (NodeError, ValueError, KeyError, TypeError):
            return
        if await trio.to_thread.run_sync(rec.live, 30.0):
            holders.append(rec.describe())

    async with trio.open_nursery() as nursery:
        for i in sorted(vol.nodes.readable()):
            nursery.start_soon(one, i)
    return holders[0] if holders else None


async def _recover(vol: Volume, state_dir: str) -> tuple[str, Superblock, int]:
    """Recover the metadata into `state_dir`, writing nothing to the nodes; also returns
    how many journal records a crash left without their blobs (walrusfs.recovery).

    Raises RecoveryError.
    """
    sb = await read_superblock(vol)
    if sb is None:
        raise RecoveryError("no metadata on the nodes: was the volume made with `walrusfs mkfs`?")
    path = os.path.join(state_dir, "metadata.db")
    got = await recover(vol, sb, path)
    got.metadata.close()
    return path, sb, got.dropped


class _Check:
    """One fsck run's state and output."""

    def __init__(self, vol: Volume, out: TextIO, repair: bool) -> None:
        self.vol, self.out, self.repair = vol, out, repair
        self.problems = 0  # found and not (yet) fixed, besides lost blobs

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def sweep(
        self, refs: dict[bytes, BlobRef], protected: set[bytes]
    ) -> dict[int, NodeSweep]:
        readable = sorted(self.vol.nodes.readable())
        total = sum(file_size(r.meta) for r in refs.values()) * len(readable)
        bar = _Progress(self.out, total)
        sweeps: dict[int, NodeSweep] = {}

        async def one(i: int) -> None:
            sweeps[i] = await sweep_node(self.vol.nodes, i, refs, protected, progress=bar.add)

        async with trio.open_nursery() as nursery:
            for i in readable:
                nursery.start_soon(one, i)
        bar.end()
        return sweeps


async def fsck(
    node_dir: str,
    *,
    repair: bool,
    out: TextIO,
    overrides: dict[int, str] | None = None,
    node_timeout: float = 10.0,
) -> int:
    """Check (and with `repair`, heal) the unmounted volume `node_dir` belongs to.

    Writes a report to `out`; returns the exit code (see the module docstring).
    """
    try:
        vol = await open_volume(node_dir, overrides, node_timeout=node_timeout)
    except VolumeError as exc:
        out.write(f"fsck: {exc}\n")
        return EXIT_ERROR
    holder = await _mounted_by(vol)
    if holder is not None:
        out.write(
            f"fsck: the volume is mounted by {holder}; unmount it first "
            "(a mounted volume heals itself: see `walrusfs status`)\n"
        )
        return EXIT_ERROR
    lock = MountLock(vol)
    if repair:
        try:
            await lock.acquire()
        except MountLockError as exc:
            out.write(f"fsck: {exc}\n")
            return EXIT_ERROR
    state = await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="walrusfs-fsck-"))
    try:
        return await _run(vol, state, out, repair)
    finally:
        with trio.CancelScope(shield=True):
            if repair:
                await lock.release()
            await trio.to_thread.run_sync(lambda: shutil.rmtree(state, ignore_errors=True))


async def _run(vol: Volume, state: str, out: TextIO, repair: bool) -> int:
    p = vol.params
    chk = _Check(vol, out, repair)
    down = [n for n in vol.nodes.nodes if n.index not in vol.nodes.readable()]
    chk.say(
        f"fsck of volume {vol.identity.volume_id} (n={p.n}, f={p.f}): "
        f"{p.n - len(down)} of {p.n} nodes readable"
    )
    for n in down:
        chk.say(f"  node {n.index} ({n.store.path}): {n.state.value}: {n.reason}")
    try:
        db_path, sb, dropped = await _recover(vol, state)
    except (RecoveryError, StorageUnavailable) as exc:
        chk.say(f"fsck: cannot recover the metadata: {exc}")
        return EXIT_ERROR
    catalog = Catalog(db_path, lambda: sb)
    try:
        refs = await catalog.load()
    finally:
        catalog.close()
    protected = catalog.protected()
    files = sum(1 for r in refs.values() if r.kind == "file")
    chk.say(f"metadata recovered: {files} file blobs, {len(refs) - files} checkpoint blobs")
    if dropped:
        chk.say(
            f"the journal's last {dropped} changes name data that a crash of the nodes lost "
            "before it was flushed: left out, as the next mount leaves them out (the files "
            "they changed are as they were before them)"
        )

    problems = await trio.to_thread.run_sync(refcount_problems, db_path)
    for line in problems:
        chk.say(f"  refcount: {line}")
    chk.say("refcounts: " + (f"{len(problems)} problems (not repaired)" if problems else "ok"))
    chk.problems += len(problems)

    sweeps = await chk.sweep(refs, protected)
    verified = sum(len(s.verified) for s in sweeps.values())
    findings = [f for s in sweeps.values() for f in s.findings]
    chk.say(
        f"sliver files: {verified} verified, "
        f"{sum(f.kind == 'missing' for f in findings)} missing, "
        f"{sum(f.kind == 'corrupt' for f in findings)} corrupt"
    )
    for f in findings:
        if f.kind == "corrupt":
            chk.say(f"  corrupt: node {f.node}: {f.key}: {f.detail}")
    for s in sweeps.values():
        if not s.complete:
            chk.say(f"  node {s.node} not fully checked: {s.error}")

    # Per blob, the pairs whose primary and whose secondary sliver verify (a corrupt file
    # may keep one whole): decodable from R primaries or C secondaries, lost otherwise.
    # A pair is good when both do.
    halves: dict[bytes, dict[str, set[int]]] = {b: {PRIMARY: set(), SECONDARY: set()} for b in refs}
    for s in sweeps.values():
        for b in s.verified:
            for axis in (PRIMARY, SECONDARY):
                halves[b][axis].add(refs[b].meta.pair_of_node(s.node))
        for f in s.findings:
            for axis in f.intact:
                halves[f.blob_id][axis].add(f.pair)
    good = {b: h[PRIMARY] & h[SECONDARY] for b, h in halves.items()}
    damaged = {b: set(range(p.n)) - g for b, g in good.items() if len(g) < p.n}
    lost = sorted(b for b, h in halves.items() if len(h[PRIMARY]) < p.R and len(h[SECONDARY]) < p.C)

    orphans = [o for s in sweeps.values() for o in s.orphans]
    removed = 0
    if repair:
        removed = await _remove_orphans(vol, orphans)
    chk.say(
        f"orphans: {len(orphans)} sliver files"
        + (f", {removed} removed" if repair else " (run with --repair to remove them)")
    )
    chk.problems += len(orphans) - removed

    healed: set[bytes] = set()
    inconsistent: list[str] = []
    if repair:
        healed, inconsistent = await _heal(vol, refs, damaged, lost, chk)
        temps = await _clean_temps(vol)
        if temps:
            chk.say(f"temp files removed: {temps}")
    unhealed = [b for b in damaged if b not in healed and b not in lost]
    if damaged:
        chk.say(
            f"blobs: {len(refs)} checked, {len(damaged)} damaged, {len(healed)} repaired, "
            f"{len(lost)} lost"
        )
    else:
        chk.say(f"blobs: {len(refs)} checked, all whole")
    for line in inconsistent:
        chk.say(f"  inconsistently encoded: {line}")
    chk.problems += len(unhealed)

    if lost:
        names = await trio.to_thread.run_sync(affected_paths, db_path, lost)
        for b in lost:
            where = names.get(b) or (
                ["<metadata checkpoint>"] if refs[b].kind == "checkpoint" else ["<no file>"]
            )
            chk.say(
                f"LOST blob {b.hex()[:16]} ({len(halves[b][PRIMARY])} primary and "
                f"{len(halves[b][SECONDARY])} secondary slivers of {p.n} verify; {p.R} "
                f"primaries or {p.C} secondaries needed): " + ", ".join(where)
            )
        chk.say(f"fsck: {len(lost)} blobs lost")
        return EXIT_LOST
    if chk.problems:
        chk.say(
            f"fsck: {chk.problems} problems remain"
            + ("" if repair else "; run `walrusfs fsck --repair` to fix what can be fixed")
        )
        return EXIT_DAMAGED
    chk.say("fsck: volume is healthy" + (" (after repair)" if damaged or orphans else ""))
    return EXIT_OK


async def _remove_orphans(vol: Volume, orphans: list[Finding]) -> int:
    removed = 0
    for o in orphans:
        if await _delete(vol, o.node, o.key):
            removed += 1
    return removed


async def _delete(vol: Volume, node: int, key: str) -> bool:
    try:
        await vol.nodes.call(node, lambda st: st.delete(key))
    except NodeError:
        return False
    return True


async def _heal(
    vol: Volume,
    refs: dict[bytes, BlobRef],
    damaged: dict[bytes, set[int]],
    lost: list[bytes],
    chk: _Check,
) -> tuple[set[bytes], list[str]]:
    engine = RepairEngine(vol, rate=None, per_node=4, cpu_threads=2)
    healed: set[bytes] = set()
    inconsistent: list[str] = []
    order = sorted((b for b in damaged if b not in lost), key=lambda b: -len(damaged[b]))
    limit = trio.Semaphore(4)

    async def one(b: bytes) -> None:
        try:
            outcome = await engine.repair(refs[b].meta, damaged[b])
        finally:
            limit.release()
        if outcome.inconsistent:
            inconsistent.append(f"{b.hex()[:16]}: {outcome.inconsistent}")
        elif not outcome.failed:
            healed.add(b)
        else:
            chk.say(
                f"  blob {b.hex()[:16]} not repaired: {'; '.join(set(outcome.failed.values()))}"
            )

    async with trio.open_nursery() as nursery:
        for b in order:
            await limit.acquire()
            nursery.start_soon(one, b)
    await engine.sync_touched()
    c = engine.counters
    if c.pairs_written:
        chk.say(
            f"repaired {c.pairs_written} sliver pairs: {c.bytes_rebuilt / MiB:.1f} MiB rebuilt "
            f"from {c.bytes_read / MiB:.1f} MiB read"
        )
    return healed, inconsistent


async def _clean_temps(vol: Volume) -> int:
    # Unmounted: nothing writes, so a temp file a minute old is left over.
    count = 0
    for i in sorted(vol.nodes.writable()):
        count += await remove_stale_temps(vol.nodes, i, older_than=60.0)
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fsck options, for `walrusfs fsck` (cli.py) and `main`."""
    parser.add_argument("--repair", action="store_true", help="fix what can be fixed")
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="INDEX=DIR",
        help="where a node moved to",
    )
    parser.add_argument("--node-timeout", type=float, default=10.0)
    parser.add_argument("node_dir", metavar="NODE_DIR")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run fsck for parsed arguments; returns the exit code."""
    overrides: dict[int, str] = {}
    for spec in args.node:
        index, sep, path = spec.partition("=")
        if not sep or not index.isdigit() or not path:
            print(f"fsck: --node takes INDEX=DIR, not {spec!r}", file=sys.stderr)
            return EXIT_ERROR
        overrides[int(index)] = path
    stream = sys.stdout if out is None else out
    code: int = trio.run(
        lambda: fsck(
            args.node_dir,
            repair=args.repair,
            out=stream,
            overrides=overrides,
            node_timeout=args.node_timeout,
        )
    )
    return code


def main(argv: list[str] | None = None) -> int:
    """`walrusfs fsck NODE_DIR [--repair]` as a plain function."""
    parser = argparse.ArgumentParser(prog="walrusfs fsck", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
