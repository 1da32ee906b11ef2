#!/usr/bin/env python3
"""badmount.py - a FUSE passthrough whose misbehaviour you change while it runs.

Mount it over a node directory to see what walrusfs does when that node's storage gets
slow, hangs, fails with EIO or fills up - then make it healthy again, without remounting.

    badmount.py mount SOURCE_DIR MOUNTPOINT [--daemon] [--control SOCKET]
    badmount.py set MOUNTPOINT (--ok | [--latency MS] [--hang] [--eio FRACTION]
                                [--enospc] [--throughput KBPS]) [--ops OPS] [--seed S]
    badmount.py status MOUNTPOINT
    badmount.py unmount MOUNTPOINT

MOUNTPOINT then shows SOURCE_DIR (fsname "badmount", type fuse.badmount). Each `set`
replaces the whole behaviour (combine flags in one call; --ok restores good health):

* --latency MS     every request waits MS milliseconds first;
* --hang           requests never answer until the behaviour changes (then they go on:
                   `set --ok` lets every hung request complete);
* --eio FRACTION   this fraction of requests fail with EIO (seeded by --seed: repeatable);
* --enospc         writes, creates and mkdirs fail with ENOSPC; statfs reports 0 free;
* --throughput KBPS  reads and writes share a KiB/s budget;
* --ops OPS        limit hang/latency/eio to these operations (e.g. --ops read,write).

How control works: the mount process (a pyfuse3 + trio server, its own process) listens
on a Unix socket, by default ``<run dir>/<id>.sock`` where the run dir is /run/badmount
for root (``$BADMOUNT_RUN_DIR`` overrides) and <id> is derived from the mountpoint path;
``<id>.json`` beside it records the pid, source, socket and log of the mount. `set` sends
one JSON line ({"op": "set", "behaviour": {...}}) and gets one back once the change is
in force - see faultlib/misbehave.py for the protocol. The socket is served by the same
event loop as the filesystem, but hung requests only wait on an event, so the control
path always answers, and nothing here ever touches the (maybe hung) mountpoint.

`unmount` detaches the mount at once (``fusermount3 -u -z``), releases hung requests and
lets the server finish what processes still have open (the kernel ends the session when
the last file closes); after --timeout it tells the server to exit, and if even that
fails, aborts the FUSE connection through /sys/fs/fuse/connections/<dev>/abort and kills
the server: a hung mount is always cleanable.

As root the mount also gets allow_other (root may always set it), with
default_permissions so the kernel still checks permission bits for other users.

Exit codes: 0 done, 1 failed, 2 bad usage. Every command takes --json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from faultlib import mounts, procs, state
from faultlib.cli import (
    EXIT_USAGE,
    Reporter,
    ScriptError,
    UsageError,
    add_json,
    dispatcher,
    run_main,
)

try:
    from faultlib.misbehave import OPS, Behaviour, ControlServer, Gate, request
except ImportError as _exc:  # trio (and pyfuse3) live in the project's venv
    print(
        f"badmount.py: error: {_exc}; run it with the project's .venv/bin/python", file=sys.stderr
    )
    sys.exit(EXIT_USAGE)

PROG = "badmount.py"
FSNAME = "badmount"
FSTYPE = "fuse.badmount"
SOCKET_MAX = 107  # sun_path holds 108 bytes with the NUL


# -- where a mount's records live ----------------------------------------------------------


def run_dir() -> str:
    """Where records, sockets and logs of running mounts live (short: socket paths are)."""
    if os.environ.get("BADMOUNT_RUN_DIR"):
        return os.environ["BADMOUNT_RUN_DIR"]
    if os.geteuid() == 0:
        return "/run/badmount"
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"badmount-{os.geteuid()}")


def _files(mountpoint: str) -> dict[str, str]:
    digest = hashlib.sha256(os.fsencode(mounts.mount_path(mountpoint))).hexdigest()[:16]
    base = os.path.join(run_dir(), digest)
    return {"record": base + ".json", "socket": base + ".sock", "log": base + ".log"}


def _record(mountpoint: str) -> dict[str, Any] | None:
    try:
        return state.load(_files(mountpoint)["record"])
    except ValueError as exc:
        raise ScriptError(str(exc)) from None


def _running(rec: dict[str, Any] | None) -> bool:
    return rec is not None and procs.alive(int(rec["pid"]), rec.get("start_time"))


def _ours(mount: mounts.Mount | None) -> bool:
    return mount is not None and (mount.fstype == FSTYPE or mount.source == FSNAME)


# -- mount ---------------------------------------------------------------------------------


def mount(args: argparse.Namespace, out: Reporter) -> None:
    source = os.path.realpath(args.source_dir)
    mp = mounts.mount_path(args.mountpoint)
    if not os.path.isdir(source):
        raise UsageError(f"{args.source_dir}: no such directory")
    if source == mp or source.startswith(mp.rstrip("/") + "/"):
        raise UsageError("the source directory must not be the mountpoint or inside it")
    rec = _record(mp)
    if _running(rec):
        raise ScriptError(f"{mp}: a badmount already runs there (pid {rec['pid']})")  # type: ignore[index]
    if _ours(mounts.top(mp)):
        raise ScriptError(f"{mp}: a dead badmount is still mounted; run `{PROG} unmount {mp}`")
    if not os.path.isdir(mp):  # safe now: nothing of ours is mounted there
        raise UsageError(f"{args.mountpoint}: no such directory")
    files = _files(mp)
    control = os.path.abspath(args.control) if args.control else files["socket"]
    if len(os.fsencode(control)) > SOCKET_MAX:
        raise UsageError(f"{control}: too long for a Unix socket path (max {SOCKET_MAX} bytes)")
    os.makedirs(run_dir(), mode=0o700, exist_ok=True)
    if args.daemon:
        _spawn(source, mp, control, files, out)
    else:
        _serve(source, mp, control, files, args.ready_fd, out)


def _spawn(source: str, mp: str, control: str, files: dict[str, str], out: Reporter) -> None:
    """Start the server in its own session; return once it has mounted."""
    r, w = os.pipe()
    cmd = [sys.executable, os.path.abspath(__file__), "mount", source, mp]
    cmd += ["--control", control, "--ready-fd", str(w)]
    with open(files["log"], "ab") as log:
        child = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(w,),
            start_new_session=True,
        )  # fmt: skip
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        said = os.read(r, 64) if ready else b""
    finally:
        os.close(r)
    if said.strip() != b"ready":
        if child.poll() is None:
            procs.stop(child.pid, None)
        raise ScriptError(f"the badmount server did not mount {mp}: {_tail(files['log'])}")
    out.action(
        f"mounted {source} on {mp} (pid {child.pid}, control {control}, log {files['log']})",
        action="mount",
        source=source,
        mountpoint=mp,
        pid=child.pid,
        control=control,
        log=files["log"],
    )
    out.result(mountpoint=mp, pid=child.pid, control=control, log=files["log"])


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


def _serve(
    source: str, mp: str, control: str, files: dict[str, str], ready_fd: int | None, out: Reporter
) -> None:
    """Mount and serve in this process until unmounted or signalled."""
    import pyfuse3
    import trio
    from faultlib.fusepass import Passthrough

    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("BADMOUNT_DEBUG") else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )
    log = logging.getLogger("badmount")
    gate = Gate(log=log.info)
    options = {f"fsname={FSNAME}", "subtype=badmount", "default_permissions"}
    if os.geteuid() == 0:
        options.add("allow_other")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control)  # a stale socket of a dead server
    pyfuse3.init(Passthrough(source, gate), mp, options)
    ours = mounts.top(mp)
    info = {"pid": os.getpid(), "source": source, "mountpoint": mp, "socket": control}
    exit_requested = False

    def request_exit() -> None:
        nonlocal exit_requested
        exit_requested = True
        gate.set(Behaviour())  # hung requests complete; pyfuse3.main waits for them
        pyfuse3.terminate()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = ControlServer(gate, control, info, request_exit)
            await nursery.start(server.serve)
            nursery.start_soon(_on_signals, request_exit)
            state.save(files["record"], {
                **info, "start_time": procs.start_time(os.getpid()), "log": files["log"],
                "mount_id": ours.mount_id if ours else None,
            })  # fmt: skip
            out.action(
                f"mounted {source} on {mp} (pid {os.getpid()}, control {control})",
                action="mount", source=source, mountpoint=mp, pid=os.getpid(), control=control,
            )  # fmt: skip
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            try:
                await pyfuse3.main(min_tasks=1, max_tasks=1000)
            except OSError as exc:  # the connection was aborted under us
                log.info("FUSE session ended: %s", exc)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        still = mounts.top(mp)
        # Unmount only our own mount: if it is gone already, umount2 would hit what is below.
        pyfuse3.close(
            unmount=ours is not None and still is not None and still.mount_id == ours.mount_id
        )
        state.remove(files["record"])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
    how = "on request" if exit_requested else "by the kernel"
    log.info("unmounted %s (%s)", mp, how)


async def _on_signals(request_exit: Any) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            request_exit()


# -- set / status --------------------------------------------------------------------------


def _control(args: argparse.Namespace) -> str:
    if args.control:
        return os.path.abspath(str(args.control))
    rec = _record(args.mountpoint)
    if not _running(rec):
        raise ScriptError(f"no badmount is running on {mounts.mount_path(args.mountpoint)}")
    return str(rec["socket"])  # type: ignore[index]


def _ask(path: str, doc: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = request(path, doc)
    except (OSError, ValueError) as exc:
        raise ScriptError(f"control socket {path}: {exc}") from None
    if not reply.get("ok"):
        raise ScriptError(f"the badmount server refused: {reply.get('error')}")
    return reply


def set_behaviour(args: argparse.Namespace, out: Reporter) -> None:
    faults = [args.latency, args.eio, args.throughput]
    if args.ok and (args.hang or args.enospc or any(v is not None for v in faults)):
        raise UsageError("--ok cannot be combined with other behaviours")
    if not args.ok and not (args.hang or args.enospc or any(v is not None for v in faults)):
        raise UsageError("say what to do: --ok, --latency, --hang, --eio, --enospc, --throughput")
    ops = tuple(o for o in (args.ops or "").split(",") if o)
    wanted = {
        "latency_ms": args.latency or 0.0,
        "hang": args.hang,
        "eio": args.eio or 0.0,
        "enospc": args.enospc,
        "throughput_kbps": args.throughput or 0.0,
        "ops": list(ops),
        "seed": args.seed,
    }
    try:
        behaviour = Behaviour.from_json(wanted)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    reply = _ask(_control(args), {"op": "set", "behaviour": behaviour.to_json()})
    was = Behaviour.from_json(reply["was"]).describe()
    mp = mounts.mount_path(args.mountpoint)
    out.action(
        f"{mp}: behaviour now {behaviour.describe()} (was {was})",
        action="set", mountpoint=mp, behaviour=reply["behaviour"], was=reply["was"],
    )  # fmt: skip
    out.result(behaviour=reply["behaviour"], describe=reply["describe"], stats=reply["stats"])


def status(args: argparse.Namespace, out: Reporter) -> None:
    reply = _ask(_control(args), {"op": "status"})
    reply.pop("ok", None)
    if not out.as_json:
        stats = reply["stats"]
        print(
            f"{reply['mountpoint']}: {reply['describe']} (source {reply['source']}, pid {reply['pid']})"
        )
        print(
            f"requests {stats['requests']}, hung now {stats['hung_now']}, "
            f"eio injected {stats['eio_injected']}, enospc injected {stats['enospc_injected']}"
        )
    out.result(**reply)


# -- unmount -------------------------------------------------------------------------------


def unmount(args: argparse.Namespace, out: Reporter) -> None:
    mp = mounts.mount_path(args.mountpoint)
    rec = _record(mp)
    mount = mounts.top(mp)
    if not _ours(mount) and not _running(rec):
        if rec is not None:
            state.remove(_files(mp)["record"])
        raise ScriptError(f"no badmount on {mp}")
    if _ours(mount):
        assert mount is not None
        res = procs.run(["fusermount3", "-u", "-z", mp], timeout=30)
        if res.returncode != 0 and _ours(mounts.top(mp)):
            raise ScriptError(f"fusermount3 -u -z {mp}: {res.stderr.strip()}")
        out.action(f"detached {mp} (fusermount3 -u -z)", action="detach", mountpoint=mp)
    if _running(rec):
        assert rec is not None
        _stop_server(rec, mount, args.timeout, out)
    elif mount is not None and _ours(mount) and mounts.abort_fuse(mount):
        out.action(f"aborted the dead server's FUSE connection {mount.dev}", action="abort")
    files = _files(mp)
    state.remove(files["record"])
    if rec is not None and not _running(rec):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(rec["socket"]))  # a killed server cannot remove its own
    if _ours(mounts.top(mp)):
        raise ScriptError(f"{mp}: still mounted (log: {files['log']})")
    # A clean end leaves nothing behind; after a failure the log stays for a post-mortem.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(files["log"])
    out.result(mountpoint=mp)


def _stop_server(
    rec: dict[str, Any], mount: mounts.Mount | None, timeout: float, out: Reporter
) -> None:
    """End the server of a detached mount, as gently as it allows.

    1. Release hung requests (behaviour ok) and keep serving: the kernel ends the session
       by itself once no process uses the detached mount, so open files finish their I/O.
    2. After `timeout`: ask the server to exit now (what is still open fails ENOTCONN).
    3. If it does not: abort the FUSE connection and kill it.
    """
    pid, started = int(rec["pid"]), rec.get("start_time")
    sock = str(rec["socket"])
    patience = min(5.0, max(timeout, 0.5))  # for each later step
    try:
        request(sock, {"op": "set", "behaviour": Behaviour().to_json()}, timeout=patience)
        out.action("released hung requests (behaviour ok)", action="release", pid=pid)
    except (OSError, ValueError):
        pass  # the server may be on its way out already (the detach ended its session)
    if _wait_exit(pid, started, timeout):
        out.action(f"server pid {pid} exited", action="exit", pid=pid)
        return
    with contextlib.suppress(OSError, ValueError):
        request(sock, {"op": "exit"}, timeout=patience)
    if _wait_exit(pid, started, patience):
        out.action(f"server pid {pid} exited on request; files still open on the mount "
                   "were cut off", action="exit", pid=pid, forced=True)  # fmt: skip
        return
    # The server does not go: fail its pending requests, then end it.
    if mount is not None and mounts.abort_fuse(mount):
        out.action(f"aborted FUSE connection {mount.dev}", action="abort", dev=mount.dev)
    what = procs.stop(pid, started, grace=patience)
    out.action(f"server pid {pid} {what}", action="stop", pid=pid, result=what)
    if what == "still running":
        raise ScriptError(f"server pid {pid} would not exit")


def _wait_exit(pid: int, started: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while procs.alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not procs.alive(pid, started)


# -- arguments -----------------------------------------------------------------------------


def _nonneg(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must not be negative")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: must be between 0 and 1")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 done, 1 failed, 2 bad usage. See `badmount.py COMMAND --help`.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "mount",
        help="mount a misbehaving passthrough of SOURCE_DIR on MOUNTPOINT",
        description="Mount SOURCE_DIR on MOUNTPOINT through a FUSE passthrough that starts "
        "healthy. In the foreground it serves until unmounted or interrupted; with --daemon "
        "it returns once the mount is up, leaving the server running (log in the run dir).",
    )
    p.add_argument("source_dir", metavar="SOURCE_DIR")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--daemon", action="store_true", help="return once mounted")
    p.add_argument("--control", metavar="SOCKET", help="control socket path (default: run dir)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    add_json(p)

    p = sub.add_parser(
        "set",
        help="change how a running mount behaves",
        description="Replace the behaviour of the badmount on MOUNTPOINT. Returns once the "
        "new behaviour is in force. Combine flags in one call; --ok is good health.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--ok", action="store_true", help="behave well (releases hung requests)")
    p.add_argument("--latency", type=_nonneg, metavar="MS", help="delay every request")
    p.add_argument("--hang", action="store_true", help="never answer until changed")
    p.add_argument("--eio", type=_fraction, metavar="FRACTION", help="fail this fraction EIO")
    p.add_argument("--enospc", action="store_true", help="writes/creates/mkdirs fail ENOSPC")
    p.add_argument("--throughput", type=_nonneg, metavar="KBPS", help="KiB/s for reads+writes")
    p.add_argument("--ops", help=f"comma list limiting hang/latency/eio; of: {','.join(OPS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the --eio choices (default 0)")
    p.add_argument("--control", metavar="SOCKET", help="talk to this control socket")
    add_json(p)

    p = sub.add_parser("status", help="show a running mount's behaviour and counters")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--control", metavar="SOCKET", help="talk to this control socket")
    add_json(p)

    p = sub.add_parser(
        "unmount",
        help="unmount, even when hung",
        description="fusermount3 -u -z MOUNTPOINT, release hung requests and let open files "
        "finish; after --timeout make the server exit, and if it will not, abort the FUSE "
        "connection and kill it.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=_nonneg, default=10.0, help="seconds to wait (default 10)")
    add_json(p)
    return top


COMMANDS = {"mount": mount, "set": set_behaviour, "status": status, "unmount": unmount}


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, parser(), argv, dispatcher(COMMANDS))


if __name__ == "__main__":
    sys.exit(main())
