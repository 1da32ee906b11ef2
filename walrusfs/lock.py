"""One mount of a volume at a time: a lease kept on the nodes, renewed by a heartbeat.

The lock file (key `mount.lock`, JSON: token, host, pid, boot_id, started_ns, heartbeat_ns,
pid_start: the holder's start time in clock ticks since boot, telling it from a reused pid)
is written to every writable node; acquiring needs n-f of them. A lock is live while its
heartbeat is younger than the lease. A lock left by a crashed mount is taken over safely:
on the same machine at once when its process is gone (or the machine rebooted), from
another machine once its lease has run out. Two mounts racing for a free volume both write
and then read back; the lower token keeps it and the other backs off.

Runs in trio tasks; not thread-safe.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass

import trio

from backends import NodeError
from walrusfs.volume import Volume

log = logging.getLogger(__name__)

LOCK_KEY = "mount.lock"
LEASE_S = 30.0


class MountLockError(Exception):
    """The volume is mounted elsewhere (or the lock cannot be taken); says by whom."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None if it is gone or a zombie.

    A killed daemon whose new parent never reaps it stays a zombie that kill(pid, 0)
    still finds; comparing start times also tells a reused pid from the lock's holder.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22 of stat(5): starttime


@dataclass(frozen=True)
class LockRecord:
    token: str
    host: str
    pid: int
    boot_id: str
    started_ns: int
    heartbeat_ns: int
    pid_start: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LockRecord:
        doc = json.loads(raw)
        return cls(
            str(doc["token"]),
            str(doc["host"]),
            int(doc["pid"]),
            str(doc["boot_id"]),
            int(doc["started_ns"]),
            int(doc["heartbeat_ns"]),
            int(doc.get("pid_start", 0)),
        )

    def live(self, lease: float) -> bool:
        """Could the holder still be running? (Blocking only on /proc reads.)"""
        if self.host == socket.gethostname():
            return self.boot_id == _boot_id() and _proc_start(self.pid) == self.pid_start
        return time.time_ns() - self.heartbeat_ns < lease * 1e9

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_ns / 1e9))
        return f"pid {self.pid} on {self.host} (since {since})"


class MountLock:
    """This mount's hold on the volume."""

    def __init__(self, vol: Volume, lease: float = LEASE_S) -> None:
        self.vol = vol
        self.lease = lease
        now = time.time_ns()
        pid = os.getpid()
        self.record = LockRecord(
            secrets.token_hex(8),
            socket.gethostname(),
            pid,
            _boot_id(),
            now,
            now,
            _proc_start(pid) or 0,
        )

    async def _read_all(self) -> dict[int, LockRecord]:
        found: dict[int, LockRecord] = {}

        async def one(i: int) -> None:
            try:
                raw = await self.vol.nodes.call(i, lambda st: st.get(LOCK_KEY))
                found[i] = LockRecord.from_bytes(raw)
            except NodeError:
                return
            except (ValueError, KeyError, TypeError):
                log.warning("node %d: damaged mount lock ignored", i)

        async with trio.open_nursery() as nursery:
            for i in sorted(self.vol.nodes.readable()):
                nursery.start_soon(one, i)
        return found

    async def _write_all(self) -> int:
        raw = self.record.to_bytes()
        ok = 0

        async def one(i: int) -> None:
            nonlocal ok
            try:
                await self.vol.nodes.call_small(
                    i, lambda st: st.put(LOCK_KEY, raw, durable=True), len(raw)
                )
                ok += 1
            except NodeError:
                return

        async with trio.open_nursery() as nursery:
            for i in sorted(self.vol.nodes.writable(small=True)):
                nursery.start_soon(one, i)
        return ok

    async def acquire(self) -> None:
        """Take the lock; raises MountLockError naming the holder if it is live."""
        others = [
            rec for rec in (await self._read_all()).values() if rec.token != self.record.token
        ]
        for other in others:
            if other.live(self.lease):
                raise MountLockError(
                    f"volume {self.vol.identity.volume_id} is already mounted by {other.describe()}; "
                    f"unmount it first (a crashed mount's lock expires {self.lease:g}s after its last heartbeat)"
                )
        # Each node holds a copy of a holder's record: say it once per holder, not per node.
        for other in {rec.token: rec for rec in others}.values():
            log.warning("taking over the lock of a mount that is gone: %s", other.describe())
        quorum = self.vol.params.n - self.vol.params.f
        if await self._write_all() < quorum:
            raise MountLockError(f"could not write the mount lock to {quorum} nodes")
        await trio.sleep(0.2)
        rivals = [
            o
            for o in (await self._read_all()).values()
            if o.token != self.record.token and o.live(self.lease) and o.token < self.record.token
        ]
        if rivals:
            await self.release()
            raise MountLockError(
                f"volume is being mounted at the same time by {rivals[0].describe()}"
            )

    async def heartbeat_forever(self) -> None:
        """Renew the lease until cancelled."""
        while True:
            await trio.sleep(self.lease / 3)
            self.record = LockRecord(**{**asdict(self.record), "heartbeat_ns": time.time_ns()})
            await self._write_all()

    async def release(self) -> None:
        """Remove our lock where it is still ours."""
        mine = [i for i, rec in (await self._read_all()).items() if rec.token == self.record.token]

        async def one(i: int) -> None:
            try:
                await self.vol.nodes.call(i, lambda st: st.delete(LOCK_KEY))
            except NodeError:
                return

        async with trio.open_nursery() as nursery:
            for i in mine:
                nursery.start_soon(one, i)
