"""Child processes the scripts start and later stop by pid, safely across pid reuse.

A pid written to a state file may belong to another process by the time someone reads
it back (the original exited, the pid was reused). So a process is remembered as
(pid, start time in clock ticks since boot, from /proc/<pid>/stat) and only signalled if
both still match.

Blocking; for scripts. Thread-safe (no state).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def start_time(pid: int) -> int | None:
    """The start time of `pid` (field 22 of /proc/<pid>/stat), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its end.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def alive(pid: int, started: int | None) -> bool:
    """Whether the process remembered as (pid, started) still runs (zombies do not)."""
    now = start_time(pid)
    return now is not None and (started is None or now == started) and not is_zombie(pid)


def released(pid: int, started: int | None) -> bool:
    """Whether the process remembered as (pid, started) is gone with all of its threads.

    A killed process whose thread waits uninterruptibly in the kernel (on a hung FUSE
    mount, say) is a zombie that still holds its files until that thread ends; a zombie
    with no thread left holds nothing, whoever reaps it."""
    if started is None or start_time(pid) != started:
        return True  # exited and reaped, or the pid is another process's now
    if not is_zombie(pid):
        return False
    try:
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


def stop(pid: int, started: int | None, grace: float = 5.0) -> str:
    """SIGTERM the remembered process, SIGKILL it after `grace` seconds; say what happened."""
    if not alive(pid, started):
        return "not running"
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return "exited"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not alive(pid, started):
                return "stopped" if sig == signal.SIGTERM else "killed"
            time.sleep(0.02)
    return "still running"


def _reap(pid: int) -> None:
    # Our own children would stay zombies otherwise; other processes' are not ours to reap.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def run(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; never raises for a non-zero exit."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: not found ({exc.strerror})")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]}: timed out after {timeout} s")


def exit_on_sigterm() -> None:
    """Make SIGTERM end this script as Ctrl-C does: SystemExit in the main thread, so its
    `finally` blocks still unmount, stop servers and restore settings. (Python's default
    for SIGTERM ends the process at once and leaves all of that behind.)"""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
