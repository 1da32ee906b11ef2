"""One mount per state directory: an flock on it, held for the mount's whole life.

The state directory holds a mount's working copy of the metadata (SQLite). Two mounts
sharing one (the same --state-dir given to mounts of two volumes) each replaced the
other's database under it, and a checkpoint then stored the other volume's tree as this
one's: found by hand, volume A remounted showing volume B's files. The mount lock on the
nodes cannot see this; it is per volume. The lock is on the directory itself, so it
needs no file (and no space: a full state disk still gets its own clear error), and the
kernel drops it when its process ends, so a crashed mount leaves nothing to clear.
"""

from __future__ import annotations

import fcntl
import os

from walrusfs.errors import StateInUse


def lock_state_dir(state_dir: str) -> int:
    """Take `state_dir` for this process and return the descriptor that holds it (close
    it to let go). Blocking. Raises StateInUse, OSError."""
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        st = os.fstat(fd)
        os.close(fd)
        raise StateInUse(
            f"state directory {state_dir} is in use by another walrusfs mount"
            f"{_holder(st)}; give each mount its own --state-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(st: os.stat_result, locks: str = "/proc/locks") -> str:
    """ " (server pid P)" of the flock on the file `st` describes, from /proc/locks."""
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(locks, encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                # 1: FLOCK  ADVISORY  WRITE 1234 fd:00:5678 0 EOF
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where:
                    return f" (server pid {fields[4]})"
    except OSError:
        pass
    return ""
