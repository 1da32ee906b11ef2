"""The metadata's life on the nodes: format, recover at mount, journal, checkpoint, close.

The local SQLite file is a working copy. Opening always recovers it from the nodes (the
newest agreed checkpoint plus the journal after it, less a tail whose blobs a crash of
every node lost: walrusfs.recovery), so a machine with an empty state directory, or with
a stale one, mounts the same tree. Each mount is a new epoch that
starts with a checkpoint of what it recovered; from then on changes are journalled.

Runs in trio tasks; not thread-safe.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import trio

from walrusfs.checkpoint import (
    RecoveryError,
    Superblock,
    read_superblock,
    write_checkpoint,
    write_superblock,
)
from walrusfs.errors import NoSpace, NotADir, StorageUnavailable, is_known, message_of
from walrusfs.journal import Journal, drop_history
from walrusfs.metadata import Metadata
from walrusfs.recovery import recover
from walrusfs.sliverfile import header_size
from walrusfs.statelock import lock_state_dir
from walrusfs.volume import Volume

log = logging.getLogger(__name__)

DB_NAME = "metadata.db"
# Checkpoint when this many changes, or bytes of them, have been journalled since the
# last one. Bytes matter since fsync patches carry file data (up to 1 MiB a record): the
# journal before a checkpoint is kept on every node and read back at every mount.
CHECKPOINT_EVERY = 20_000
CHECKPOINT_BYTES = 64 << 20
# ... or a 1/JOURNAL_SHARE of the smallest node's filesystem, if less: every node holds
# the whole journal, and a small node would otherwise fill with it.
JOURNAL_SHARE = 16
# While a node is full, checkpoint once there are new changes (deletes, as a rule: the
# journal files a checkpoint lets go are what gives a full node its space back), and
# while the superblock carries journals (see _carry); at most every FULL_RETRY_S
# seconds and in at most 1/FULL_DUTY of the time.
FULL_RETRY_S = 5.0
FULL_DUTY = 20
# Changes not made durable by fsync() are made so once they are this many seconds old
# (0: never; only fsync() and unmount do), as ext4 commits every 5 s. It
# bounds what a power loss of every node takes of closed files, and what recovery reads
# back after a crash to check that the blobs of those changes survived (walrusfs.recovery).
DEFAULT_COMMIT_S = 5.0


def db_path(state_dir: str) -> str:
    return os.path.join(state_dir, DB_NAME)


async def format_metadata(
    vol: Volume, state_dir: str, *, uid: int, gid: int, mode: int = 0o755
) -> Superblock:
    """Create the empty filesystem and its first checkpoint (mkfs). Raises StorageUnavailable."""
    await trio.to_thread.run_sync(make_state_dir, state_dir)
    path = db_path(state_dir)
    for suffix in ("", "-wal", "-shm"):
        if await trio.to_thread.run_sync(os.path.exists, path + suffix):
            await trio.to_thread.run_sync(os.unlink, path + suffix)
    md = Metadata(
        path,
        block_size=vol.identity.blob_size,
        root_uid=uid,
        root_gid=gid,
        root_mode=mode,
        now_ns=time.time_ns(),
    )
    md.close()
    return await write_checkpoint(
        vol, path, epoch=1, chain_seq=0, chain_hash=bytes(32), previous=None
    )


class MetaStore:
    """An open volume's metadata: the database, its journal, and checkpoint bookkeeping."""

    def __init__(
        self,
        vol: Volume,
        metadata: Metadata,
        journal: Journal,
        superblock: Superblock,
        dropped: int = 0,
        torn: dict[bytes, tuple[int, ...]] | None = None,
        tail: dict[bytes, bytes] | None = None,
    ) -> None:
        self.vol = vol
        # Journal records recovery left out: a crash lost their blobs (walrusfs.recovery).
        self.dropped = dropped
        # Blobs kept whose sliver files a crash left short on some nodes: blob -> nodes.
        self.torn = torn or {}
        # Blobs kept that were written after the last durable sync (Recovered.tail).
        self.tail = tail or {}
        self.metadata = metadata
        self.journal = journal
        self.superblock = superblock
        self._checkpointing = trio.Lock()
        self._state_lock: int | None = None  # holds the state directory (statelock)
        self._tried_at: float | None = None  # when the last checkpoint ended (trio time)
        self._took = 0.0  # and how long it took
        vol.nodes.reserve_extra = checkpoint_footprint(vol, superblock.size)
        # The newest committed checkpoint's (epoch, cut): log files up to it are history.
        # Not those of a checkpoint that carries them (see _carry).
        self._history: tuple[int, int] | None = (
            None if superblock.carry else (superblock.epoch, superblock.chain_seq)
        )

    @classmethod
    async def open(cls, vol: Volume, state_dir: str) -> MetaStore:
        """Recover the metadata from the nodes into `state_dir`, held for this mount alone
        until `close` (walrusfs.statelock), and start a new epoch.

        Raises RecoveryError (never formatted, or not recoverable), StorageUnavailable,
        or StateInUse (another mount holds `state_dir`).
        """
        sb = await read_superblock(vol)
        if sb is None:
            raise RecoveryError(
                "this volume has no metadata yet: was it created with `walrusfs mkfs`?"
            )
        await trio.to_thread.run_sync(make_state_dir, state_dir)
        held = await trio.to_thread.run_sync(lock_state_dir, state_dir)
        try:
            store = await cls._open(vol, sb, state_dir)
        except BaseException:
            os.close(held)
            raise
        store._state_lock = held
        return store

    @classmethod
    async def _open(cls, vol: Volume, sb: Superblock, state_dir: str) -> MetaStore:
        path = db_path(state_dir)
        got = await recover(vol, sb, path)
        md, seq, prev = got.metadata, got.seq, got.prev
        try:
            md.set_journal_seq(seq)
            epoch = sb.epoch + 1
            try:
                new = await _write_checkpoint(
                    vol, path, epoch=epoch, chain_seq=seq, chain_hash=prev, previous=sb
                )
            except NoSpace as exc:
                new = await _carry(vol, sb, epoch, seq, exc)
        except BaseException:
            md.close()
            raise
        if seq > sb.seq:
            log.info("recovered %d journalled changes after the checkpoint", seq - sb.seq)
        journal = Journal(vol.nodes, vol.params.n - vol.params.f, epoch, seq, prev)
        md.attach_journal(journal)
        return cls(vol, md, journal, new, got.dropped, got.torn, got.tail)

    async def sync(self, *, durable: bool = False) -> None:
        """Make every committed change survive the loss of this machine (see Journal.sync)."""
        await self.journal.sync(durable=durable)

    async def checkpoint(self) -> None:
        """Write a new checkpoint; the journal before it is then only history."""
        async with self._checkpointing:
            began = trio.current_time()
            try:
                chain_seq, chain_hash = await self.journal.rotate()
                self.superblock = await _write_checkpoint(
                    self.vol,
                    self.metadata.path,
                    epoch=self.journal.epoch,
                    chain_seq=chain_seq,
                    chain_hash=chain_hash,
                    previous=self.superblock,
                )
            finally:
                self._tried_at = trio.current_time()
                self._took = self._tried_at - began
            self._history = (self.journal.epoch, chain_seq)
            self.vol.nodes.reserve_extra = checkpoint_footprint(self.vol, self.superblock.size)

    async def drop_history(self) -> None:
        """Delete the journal log files the newest checkpoint made history (if not yet)."""
        if self._history is not None:
            epoch, cut = self._history
            removed = await drop_history(self.vol.nodes, epoch, cut)
            if self._history == (epoch, cut):
                self._history = None
            if removed:
                log.debug("removed %d journal log files older than the checkpoint", removed)

    def checkpoint_due(self) -> bool:
        if (
            self.journal.seq - self.superblock.seq >= CHECKPOINT_EVERY
            or self.journal.log_bytes >= self._checkpoint_bytes()
        ):
            return True
        if not self.superblock.carry and (
            not self.vol.nodes.full_count() or self.journal.seq <= self.superblock.seq
        ):
            return False
        wait = max(FULL_RETRY_S, FULL_DUTY * self._took)
        return self._tried_at is None or trio.current_time() - self._tried_at >= wait

    def _checkpoint_bytes(self) -> int:
        totals = [n.total for n in self.vol.nodes.nodes if n.total]
        return min([CHECKPOINT_BYTES, *(t // JOURNAL_SHARE for t in totals)])

    async def run_background(self, interval: float = 1.0, commit: float = DEFAULT_COMMIT_S) -> None:
        """Sync the journal every `interval` seconds, and durably once changes are
        `commit` seconds old (0: never); checkpoint when due. Until cancelled."""
        clean_at = trio.current_time()  # when no change was waiting to be durable
        while True:
            await trio.sleep(interval)
            try:
                if not self.journal.undurable:
                    clean_at = trio.current_time()
                elif commit and trio.current_time() - clean_at >= commit:
                    try:
                        await self.journal.sync(durable=True, promise=False)
                    except StorageUnavailable as exc:  # tried again `commit` s from now
                        log.debug("background durable sync failed: %s", exc)
                    clean_at = trio.current_time()
                self.journal.mark()
                if self.journal.lag:
                    await self.journal.sync()
                if self.checkpoint_due():
                    await self.checkpoint()
                await self.drop_history()
            except Exception as exc:  # nodes missing: retried on the next round, shown in status
                log.debug("background metadata sync failed: %s", exc)

    async def close(self) -> None:
        """Final durable sync and checkpoint, then close the database.

        Once the sync is durable the journal on the nodes holds every change, and the
        checkpoint only shortens the next mount's replay: its failure loses nothing, so
        it is logged, not raised (as the background's are)."""
        try:
            await self.journal.sync(durable=True)
            try:
                await self.checkpoint()
            except Exception as exc:
                # A full or vanished state disk, nodes down: expected, told in a line.
                known = is_known(exc)
                log.log(
                    logging.WARNING if known else logging.ERROR,
                    "no checkpoint at unmount (%s); the next mount replays the journal",
                    message_of(exc),
                    exc_info=None if known else exc,
                )
        finally:
            self.metadata.close()
            if self._state_lock is not None:
                os.close(self._state_lock)
                self._state_lock = None


async def _write_checkpoint(vol: Volume, path: str, **where: Any) -> Superblock:
    """write_checkpoint; on nodes out of space, once more after they give up their
    reserves (walrusfs.nodeset): a mount must write one, a volume filled to the last
    byte too, and a checkpoint is what lets a full node's journal files go."""
    try:
        return await write_checkpoint(vol, path, **where)
    except NoSpace as exc:
        if not await vol.nodes.release_reserves():
            raise
        log.warning("checkpoint retried in the nodes' space reserves: %s", exc)
    return await write_checkpoint(vol, path, **where)


def make_state_dir(state_dir: str) -> None:
    """Create the state directory if missing (blocking). Raises NotADir, OSError."""
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise NotADir(f"state directory {state_dir}: exists and is not a directory") from None


async def _carry(vol: Volume, sb: Superblock, epoch: int, seq: int, why: NoSpace) -> Superblock:
    """Start session `epoch` without a new snapshot, for nodes too full to store one: a
    superblock that names `sb`'s snapshot and carries its journal, up to the `seq` just
    recovered, for recovery to replay before the new session's. Those log files stay
    until a checkpoint (MetaStore.checkpoint_due retries while nodes are full) holds
    what they do. Without this, a volume filled to the last byte would not mount, and
    so could not be given its space back. Raises StorageUnavailable."""
    new = dataclasses.replace(
        sb, epoch=epoch, carry=(*sb.carry, (sb.epoch, seq)), created_ns=time.time_ns()
    )
    await write_superblock(vol, new)
    log.warning(
        "mounted without a metadata checkpoint, the nodes are too full for one (%s): the "
        "next mounts replay the journal of %d earlier sessions until one is written",
        why,
        len(new.carry),
    )
    return new


def checkpoint_footprint(vol: Volume, size: int) -> int:
    """About the bytes a checkpoint of `size` bytes takes on each node, twice over: the
    next one may be bigger, and is written before the one before it is deleted."""
    p = vol.params
    per_blob = vol.identity.blob_size
    blobs = max(1, -(-size // per_blob))
    pair = header_size(p.n) + (p.R + p.C) * p.symbol_size(min(size, per_blob))
    return 2 * blobs * pair + (64 << 10)
