"""Mount lifecycle: serve a FileSystem on a mountpoint until it is unmounted.

Role: `serve` mounts (pyfuse3.init), starts the FileSystem's background work (orphan
cleanup, the flusher, read-ahead) in the mount's nursery, runs pyfuse3's main loop, and
on the way out, however it leaves, flushes every file's dirty data and unmounts.

Options: fsname=walrusfs and subtype=walrusfs (mounts show as `walrusfs` of type
`fuse.walrusfs`), default_permissions (the kernel checks mode bits with the caller's
supplementary groups; see walrusfs.fs), noatime (atime changes only when set
explicitly), and allow_other only when asked for.

Stopping: a user unmounts (`fusermount3 -u MOUNTPOINT`): the kernel first writes back
its cached pages through us, then pyfuse3.main returns and serve flushes and returns.
Cancelling the task running serve is the forced stop: requests in flight get no answer
(their callers see the mount go away), and pages the kernel still held for open,
mmap'ed files are lost; data already handed to us is flushed first.
A killed process leaves a dead mount (ENOTCONN), never an empty folder in its place;
`fusermount3 -u -z` clears it.

Only this module and walrusfs.fuse_ops import pyfuse3; pyfuse3 allows one mount per
process.

Thread/task safety: call from the trio thread; one serve at a time per process.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import pyfuse3
import trio

from backends.remote import mount_devices
from walrusfs.control import real_mountpoint
from walrusfs.errors import is_known, message_of
from walrusfs.fs import FileSystem
from walrusfs.fuse_ops import FuseOperations

log = logging.getLogger(__name__)

# Kernel read-ahead for the mount, in KiB. FUSE mounts start at 128 KiB, which makes the
# kernel ask for 128 KiB at a time, one or two requests ahead of the reader; a sequential
# reader is served faster with 1 MiB requests several deep (measured: 310 -> 400 MB/s).
READ_AHEAD_KB = 8192


def tune_read_ahead(mountpoint: str, kib: int = READ_AHEAD_KB) -> bool:
    """Raise the kernel's read-ahead for our mount; False where not permitted (not root).

    Blocking (procfs, sysfs): run it in a worker thread. Reads no file of the mount
    itself: this process serves it, so a stat would deadlock.
    """
    try:
        # The kernel lists the mount under its real path: a mountpoint given through a
        # symlink must be resolved first, without a stat of it (see real_mountpoint).
        dev = mount_devices().get(real_mountpoint(mountpoint))
        if dev is None:
            return False
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        log.debug("kernel read-ahead of %s left as it is: %s", mountpoint, exc)
        return False
    return True


def mount_options(*, allow_other: bool = False) -> set[str]:
    """The FUSE mount options serve uses."""
    options = set(pyfuse3.default_options)  # default_permissions
    options |= {"default_permissions", "fsname=walrusfs", "subtype=walrusfs", "noatime"}
    if allow_other:
        options.add("allow_other")
    return options


async def serve(
    fs: FileSystem,
    mountpoint: str,
    *,
    allow_other: bool = False,
    ready: Callable[[], object] | None = None,
    stop_signals: tuple[int, ...] = (),
) -> None:
    """Mount `fs` at `mountpoint` and serve it until unmounted (or cancelled).

    `ready` is called once the kernel has set up the mount (INIT answered) and background
    work runs. Any of `stop_signals` (main thread only) unmounts as `umount` does: a
    system shutting down sends SIGTERM, and the mount must then store what it holds
    rather than die with it. Raises RuntimeError if the mount fails; re-raises whatever
    stopped the main loop.
    """
    negotiated = trio.Event()
    ops = FuseOperations(fs, on_init=negotiated.set)
    pyfuse3.init(ops, mountpoint, mount_options(allow_other=allow_other))
    log.info("walrusfs mounted at %s", mountpoint)

    async def main_loop(nursery: trio.Nursery) -> None:
        await pyfuse3.main()
        nursery.cancel_scope.cancel()  # unmounted: stop the background work

    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(*stop_signals) as received:
            async for signum in received:
                log.info("%s: unmounting %s", signal.Signals(signum).name, mountpoint)
                pyfuse3.terminate()  # main() returns; the shutdown below stores everything
                return

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run_background)
            nursery.start_soon(main_loop, nursery)
            if stop_signals:
                nursery.start_soon(stop_on_signal)
            # The kernel sets the mount's read-ahead while it processes INIT: raise it
            # after that, or it is lowered again.
            await negotiated.wait()
            await trio.to_thread.run_sync(tune_read_ahead, mountpoint)
            if ready is not None:
                ready()
    finally:
        # Flush before unmounting: while the mountpoint is busy nobody can mount the
        # same volume again and have two processes write one metadata database.
        try:
            with trio.CancelScope(shield=True):
                await fs.shutdown()
        except Exception as exc:
            # What a close() or fsync() committed is in the journal on the nodes and comes
            # back at the next mount; what none did (a close that failed) may be lost.
            log.error(
                "flushing at unmount failed (%s): changes that no close() or fsync() "
                "committed may be lost",
                message_of(exc),
                exc_info=not is_known(exc),
            )
            raise
        finally:
            pyfuse3.close(unmount=True)  # lazy: cannot fail on a busy mount
            log.info("walrusfs at %s unmounted", mountpoint)
