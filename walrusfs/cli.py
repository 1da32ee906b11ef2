"""The `walrusfs` command line (and `mount.walrusfs`, for mount(8) and /etc/fstab).

Thin: parses arguments, sets up logging, and calls into the core. `mount` without
--foreground starts the server as a child process and returns once the mount is ready,
or fails with the child's own error message if it cannot be.

Must not import pyfuse3 (only the mount lifecycle does, in the server process).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import trio

from walrusfs import __version__
from walrusfs.errors import leaves_of, message_of

log = logging.getLogger("walrusfs")

# How long `walrusfs mount` waits for an earlier walrusfs mount at its mountpoint to
# answer before it refuses to mount there (a live server answers statvfs at once).
MOUNT_PROBE_TIMEOUT = 5.0
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


# The smallest read cache a mount takes (--cache-size).
MIN_CACHE = 1 << 20


def parse_size(text: str) -> int:
    """'4M', '4MiB', '65536' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4M or 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_node(text: str) -> tuple[int, str]:
    index, sep, path = text.partition("=")
    if not sep or not index.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"--node takes INDEX=DIR, not {text!r}")
    return int(index), path


def default_state_dir(volume_id: str) -> str:
    if os.geteuid() == 0:
        return os.path.join("/var/lib/walrusfs", volume_id)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "walrusfs", volume_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walrusfs",
        description="An erasure-coded filesystem over n node directories (Red Stuff encoding).",
    )
    parser.add_argument("--version", action="version", version=f"walrusfs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("mkfs", help="create a volume over n node directories")
    p.add_argument(
        "--faults", "-f", type=int, default=None, help="nodes that may fail (default (n-1)//3)"
    )
    p.add_argument(
        "--blob-size", type=parse_size, default=4 << 20, help="file data per blob (default 4M)"
    )
    p.add_argument("nodes", nargs="+", metavar="NODE_DIR")

    p = sub.add_parser("mount", help="mount the volume a node directory belongs to")
    p.add_argument(
        "--foreground", action="store_true", help="serve in this process until unmounted"
    )
    p.add_argument(
        "--node",
        action="append",
        type=parse_node,
        default=[],
        metavar="INDEX=DIR",
        help="where a node moved to",
    )
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    p.add_argument("--state-dir", default=None, help="local working copy of the metadata")
    p.add_argument(
        "--node-timeout", type=float, default=10.0, help="seconds before a node call is abandoned"
    )
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default=None,
        help="memory for file data read from the nodes (default 64M, at least 1M)",
    )
    p.add_argument(
        "--commit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="make closed files durable (on the nodes' disks) this long after they changed, "
        "as fsync() does at once; 0: only fsync() and unmount do (default 5)",
    )
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("node_dir", metavar="NODE_DIR")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")

    p = sub.add_parser("umount", help="unmount, returning once everything is stored")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=600.0)

    p = sub.add_parser("status", help="node states, space, dirty data and degraded blobs")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("repair", help="run a repair pass on a mounted volume now and wait for it")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p = sub.add_parser("scrub", help="verify every sliver of a mounted volume now and wait for it")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p = sub.add_parser(
        "replace-node", help="a new empty directory takes a node's place; rebuilt in the background"
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("index", type=int, metavar="INDEX")
    p.add_argument("new_dir", metavar="NEW_DIR")
    from walrusfs import fsck

    p = sub.add_parser("fsck", help="check an unmounted volume; --repair heals what it can")
    fsck.add_arguments(p)

    p = sub.add_parser("demo", help="mount a demo volume under ./demo (or --codec: a codec demo)")
    p.add_argument("--codec", action="store_true", help="show the erasure code on one blob instead")
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    # The pid: every mount's server appends to the same log file, and `walrusfs mount`
    # prints its server's pid.
    logging.basicConfig(
        level=level, format="%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s"
    )


def cmd_mkfs(args: argparse.Namespace) -> int:
    from walrusfs.metastore import format_metadata
    from walrusfs.volume import create_volume, open_volume

    async def run() -> tuple[str, str]:
        volume_id = await create_volume(args.nodes, args.faults, args.blob_size)
        vol = await open_volume(args.nodes[0])
        # The first checkpoint goes to the nodes; the database it is made from is only a
        # working copy (every mount recovers its own), so it is not left behind.
        with tempfile.TemporaryDirectory(prefix="walrusfs-mkfs-") as state:
            await format_metadata(vol, state, uid=os.getuid(), gid=os.getgid())
        p = vol.params
        return (
            volume_id,
            f"n={p.n} nodes, f={p.f}, R={p.R}, C={p.C}, blob size {vol.identity.blob_size}",
        )

    volume_id, summary = trio.run(run)
    print(f"created volume {volume_id}: {summary}")
    print(f"mount it with: walrusfs mount {args.nodes[0]} MOUNTPOINT")
    return 0


def _mount_foreground(args: argparse.Namespace) -> int:
    from walrusfs.service import MountOptions, run_mount
    from walrusfs.volume import identity_of

    ready_fd = args.ready_fd

    def ready(warnings: list[str]) -> None:  # the log has them already
        if ready_fd is not None:
            # One line each: the first says the mount is ready, the others are warnings.
            lines = ["ok", *(w.replace("\n", " ") for w in warnings)]
            os.write(ready_fd, "".join(f"{x}\n" for x in lines).encode())
            os.close(ready_fd)

    mountpoint = os.path.abspath(args.mountpoint)

    async def run() -> None:
        # Only for the state directory's name: run_mount opens the volume.
        ident = await identity_of(args.node_dir, node_timeout=args.node_timeout)
        opts = MountOptions(
            node_dir=args.node_dir,
            mountpoint=mountpoint,
            state_dir=args.state_dir or default_state_dir(ident.volume_id),
            overrides=dict(args.node),
            allow_other=args.allow_other,
            node_timeout=args.node_timeout,
        )
        if args.cache_size is not None:
            opts.cache_bytes = args.cache_size
        if args.commit is not None:
            opts.commit_s = args.commit
        await run_mount(opts, ready)

    try:
        trio.run(run)
    except BaseException as exc:
        if ready_fd is not None:
            try:
                os.write(ready_fd, f"error: {message_of(exc)}\n".encode())
            except OSError:
                pass
        raise
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    if args.cache_size is not None and args.cache_size < MIN_CACHE:
        raise SystemExit("walrusfs: error: --cache-size must be at least 1M")
    if args.commit is not None and not 0 <= args.commit < float("inf"):
        raise SystemExit("walrusfs: error: --commit must be 0 or more seconds")
    _clear_dead_mount(args.mountpoint)
    if not os.path.isdir(args.mountpoint):
        raise SystemExit(f"walrusfs: error: mountpoint {args.mountpoint}: not a directory")
    if args.foreground:
        return _mount_foreground(args)
    read_fd, write_fd = os.pipe()
    argv = (
        [sys.executable, "-m", "walrusfs.cli"]
        + ["-v"] * args.verbose
        + ["mount", "--foreground", "--ready-fd", str(write_fd)]
    )
    for index, path in args.node:
        argv += ["--node", f"{index}={path}"]
    if args.allow_other:
        argv.append("--allow-other")
    if args.state_dir:
        argv += ["--state-dir", args.state_dir]
    if args.cache_size is not None:
        argv += ["--cache-size", str(args.cache_size)]
    if args.commit is not None:
        argv += ["--commit", str(args.commit)]
    argv += ["--node-timeout", str(args.node_timeout), args.node_dir, args.mountpoint]
    log_path = (
        os.path.join(os.path.expanduser("~"), ".walrusfs-mount.log")
        if os.geteuid()
        else "/var/log/walrusfs.log"
    )
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            argv,
            pass_fds=[write_fd],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.readline().decode().strip()
        warnings = [w.decode().strip() for w in pipe] if answer == "ok" else []
    if answer == "ok":
        print(f"mounted at {args.mountpoint} (server pid {child.pid}, log {log_path})")
        for line in warnings:
            print(f"walrusfs: warning: {line}", file=sys.stderr)
        return 0
    child.wait(timeout=30)
    raise SystemExit(
        f"walrusfs: error: mount failed: {answer.removeprefix('error: ') or f'server exited ({child.returncode}), see {log_path}'}"
    )


def _listed_mount(path: str) -> str | None:
    """The type of the mount the kernel lists at `path`, if any (also one whose server is
    gone, which stat() cannot tell from a broken directory); of the top one, which an
    unmount would take away, where several are stacked there."""
    from walrusfs.control import real_mountpoint

    want = real_mountpoint(path)
    found = None
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) < 3:
                continue
            # Spaces and the like are octal escapes there (\040).
            where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            if where == want:
                found = fields[2]
    return found


def _clear_dead_mount(mountpoint: str) -> None:
    """A walrusfs mount whose server died (killed, crashed) is left behind, answering
    ENOTCONN: unmount it, so that mounting again after a crash just works. A walrusfs
    mount that does not answer at all is refused with a clear message instead of waited
    for. Anything else at the mountpoint is left alone (and not even looked at)."""
    if _listed_mount(mountpoint) != "fuse.walrusfs":
        return
    answer = _probe_mount(mountpoint, MOUNT_PROBE_TIMEOUT)
    if answer is None:
        raise SystemExit(
            f"walrusfs: error: {mountpoint}: a walrusfs mount is there and does not answer "
            f"within {MOUNT_PROBE_TIMEOUT:g}s (its server is stuck, perhaps on a hung node "
            "directory, or was killed and has not exited yet); nothing was mounted. Once "
            f"no server of it is left, `umount -l {mountpoint}` clears it."
        )
    if answer == 0:
        # Stacked over it, the new server would take its control socket (named after
        # the mountpoint): status and umount would find only the top one.
        raise SystemExit(
            f"walrusfs: error: {mountpoint}: a walrusfs mount is there already and "
            f"answering{_whose(mountpoint)}; nothing was mounted. Unmount it first "
            f"(`walrusfs umount {mountpoint}`) or mount somewhere else."
        )
    if answer not in (errno.ENOTCONN, errno.ECONNABORTED):  # aborted through fusectl
        return
    res = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
    if res.returncode == 0:
        print(
            f"walrusfs: cleared the dead mount a gone server left at {mountpoint}", file=sys.stderr
        )


def _whose(mountpoint: str) -> str:
    """ " (volume V, server pid P)" from the mount's control socket, or "" if it is silent."""
    from walrusfs.control import ControlError, query

    try:
        st = query(mountpoint)
    except ControlError:
        return ""
    return f" (volume {st.get('volume_id')}, server pid {st.get('pid')})"


def _probe_mount(mountpoint: str, timeout: float) -> int | None:
    """statvfs of a mount (stat() may answer from attributes the kernel cached): 0 if it
    answered, its errno if it failed, None if it did not answer within `timeout`.

    The call runs in a daemon thread that is left behind when it does not return: its
    request waits in the kernel for a server that may never read it, and a request not
    yet read ends with this process."""
    outcome: list[int] = []
    answered = threading.Event()

    def probe() -> None:
        try:
            os.statvfs(mountpoint)
            outcome.append(0)
        except OSError as exc:
            outcome.append(exc.errno or errno.EIO)
        answered.set()

    threading.Thread(target=probe, name="mount probe", daemon=True).start()
    return outcome[0] if answered.wait(timeout) else None


def cmd_umount(args: argparse.Namespace) -> int:
    from walrusfs.control import ControlError, query, take_outcome

    try:
        pid = int(str(query(args.mountpoint)["pid"]))
    except ControlError:
        pid = None
    kind = _listed_mount(args.mountpoint)
    if pid is None and kind is None:
        raise SystemExit(f"walrusfs: error: {args.mountpoint}: nothing is mounted there")
    if kind is not None and kind != "fuse.walrusfs":
        # As root fusermount3 unmounts anything: a mistyped path (the disk holding the
        # node directories, say) must not be taken away.
        raise SystemExit(
            f"walrusfs: error: {args.mountpoint}: the mount there is {kind}, not walrusfs; "
            "nothing was unmounted"
        )
    res = subprocess.run(["fusermount3", "-u", args.mountpoint], capture_output=True, text=True)
    if res.returncode:
        why = res.stderr.strip() or "fusermount3 failed"
        if "busy" in why:
            why += (
                "; a process has a file open or its working directory in it "
                f"(`fuser -vm {args.mountpoint}` shows which); nothing was unmounted"
            )
        raise SystemExit(f"walrusfs: error: {why}")
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ")[-1].startswith("Z"):
                        break  # exited, not yet reaped by its parent
            except OSError:
                break
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}") and time.monotonic() >= deadline:
            raise SystemExit(
                f"walrusfs: error: the server (pid {pid}) is still storing data after {args.timeout:g}s"
            )
    if pid is None:
        raise SystemExit(
            f"walrusfs: error: unmounted {args.mountpoint}, but no walrusfs server answered "
            "there: whether everything was stored is unknown (the next mount recovers what "
            "the journal holds)"
        )
    outcome = take_outcome(args.mountpoint)
    if outcome != "ok":
        why = outcome.removeprefix("error: ") if outcome else "it ended without saying"
        raise SystemExit(
            f"walrusfs: error: unmounted {args.mountpoint}, but not everything may be stored: "
            f"{why} (see the log; the next mount recovers what the journal holds)"
        )
    print(f"unmounted {args.mountpoint}: all data and metadata stored")
    return 0


def _human(n: object) -> str:
    if not isinstance(n, int):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return str(n)


def cmd_status(args: argparse.Namespace) -> int:
    from walrusfs.control import query

    st = query(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(
        f"walrusfs at {st['mountpoint']} (volume {st['volume_id']}, n={st['n']}, f={st['f']}, pid {st['pid']})"
    )
    nodes = st["nodes"]
    assert isinstance(nodes, list)
    for n in nodes:
        reason = f"  {n['reason']}" if n["state"] != "up" and n["reason"] else ""
        reserve = f" (reserve {_human(n['reserve'])})" if n.get("reserve") is not None else ""
        print(
            f"  node {n['index']}: {n['state']:8s} free {_human(n['free']):>10s} of {_human(n['total']):>10s}"
            f"{reserve}  {n['latency_ms']:7.2f} ms  errors {n['errors']} corrupt {n['corrupt']}"
            f"  {n['path']}{reason}"
        )
    if st.get("out_of_room"):
        print(
            "  out of room: too few nodes have space for n-f copies; new data, names and xattrs "
            "get ENOSPC, while deletes, renames and attribute changes go on"
        )
    carries = st.get("checkpoint_carries")
    if isinstance(carries, int) and carries:
        sessions = "1 earlier session" if carries == 1 else f"{carries} earlier sessions"
        print(
            f"  metadata: no checkpoint fits on the full nodes; a mount replays the journal of "
            f"{sessions} until one does"
        )
    cache = st["read_cache"]
    assert isinstance(cache, dict)
    print(
        f"  files {st['files']}, blobs {st['blobs']}, dirty {_human(st['dirty_bytes'])}, "
        f"read cache {_human(cache['used'])} of {_human(cache['size'])}, "
        f"journal lag {st['journal_lag']}, "
        f"freed blobs awaiting deletion {st.get('deletes_pending', 0)}"
    )
    use = st.get("usage")
    if st.get("usage_error"):
        print(f"  data: not known now ({st['usage_error']})")
    if isinstance(use, dict):
        packs = (
            f"; packs {_human(use['pack_bytes'])}, {_human(use['pack_dead_bytes'])} of it no longer used"
            if use["pack_bytes"]
            else ""
        )
        rest = ", the rest holes or not yet packed" if use["data_bytes"] < use["file_bytes"] else ""
        print(
            f"  data {_human(use['file_bytes'])} in files ({_human(use['data_bytes'])} of it in blobs"
            f"{rest}); blobs {_human(use['blob_bytes'])}, about {_human(use['node_bytes'])} on the "
            f"nodes{packs}"
        )
    health = st.get("health")
    if isinstance(health, dict):
        print(
            f"  blobs: {health['healthy']} healthy, {health['degraded']} degraded, "
            f"{health['at_risk']} at risk (one more node loss away), {health['unreadable']} unreadable now; "
            f"more node losses each survives: {health['survives']}"
        )
    rep = st.get("repair")
    if isinstance(rep, dict):
        eta = f", ETA {rep['eta_s']}s" if rep.get("eta_s") else ""
        print(
            f"  repair: {'running' if rep['running'] else 'idle'}, queue {rep['queue']} "
            f"({_human(rep['pending_bytes'])}), rebuilt {_human(rep['bytes_rebuilt'])} at "
            f"{_human(rep['rate'])}/s{eta}, rebuilding nodes {rep['rebuilding_nodes'] or 'none'}"
        )
        last = rep.get("last_pass")
        if isinstance(last, dict):
            print(
                f"    last pass: {last['blobs_repaired']} blobs repaired, "
                f"{len(last['unrepairable'])} unrepairable now, {len(last['inconsistent'])} inconsistent"
            )
    scrub = st.get("scrub")
    if isinstance(scrub, dict):
        print(_scrub_line(scrub))
    return 0


def _scrub_line(scrub: dict[str, Any]) -> str:
    """The scrub's part of `status`, in words."""
    if scrub["running"]:
        done = scrub.get("progress")
        state = "running" + (f" ({done:.0%} of a pass)" if done is not None else "")
    else:
        state = "idle"
    parts = [state]
    if scrub.get("after_crash_left"):
        parts.append(f"checking {scrub['after_crash_left']} sliver files written before a crash")
    limit = scrub.get("rate_limit")
    parts.append(f"rate limit {_human(int(limit)) + '/s' if limit else 'none'}")
    parts.append(f"errors found {scrub['errors_found']}")
    parts.append(f"orphans waiting for removal {scrub['orphans_pending']}")
    line = "  scrub: " + ", ".join(parts)
    last = scrub.get("last_pass")
    if isinstance(last, dict):
        line += (
            f"\n    last pass: {last['files']} files ({_human(last['bytes'])}) in "
            f"{last['duration']:.0f}s, {len(last['corrupt'])} corrupt, {last['missing']} missing, "
            f"{last['orphans']} orphans ({last['orphans_removed']} removed)"
            + (", incomplete" if last["incomplete"] or last["cancelled"] else "")
        )
    else:
        line += "\n    no pass yet (the first starts a minute after mounting)"
    return line


def _report(title: str, rep: dict[str, object]) -> int:
    """Print a repair or scrub report; 1 if it found something it could not fix."""
    print(
        f"{title}: "
        + ", ".join(f"{k} {v}" for k, v in rep.items() if not isinstance(v, dict | list))
    )
    problems = 0
    for key in ("unrepairable", "inconsistent", "lost", "corrupt", "incomplete"):
        items = rep.get(key)
        if items:
            problems += key != "corrupt"
            print(f"  {key}:")
            listing = list(items.items()) if isinstance(items, dict) else [(x, "") for x in items]  # type: ignore[attr-defined]
            for name, why in listing:
                print(f"    {name} {why}".rstrip())
    return 1 if problems else 0


def cmd_repair(args: argparse.Namespace) -> int:
    from walrusfs.control import query

    return _report("repair pass", query(args.mountpoint, "repair", timeout=None))


def cmd_scrub(args: argparse.Namespace) -> int:
    from walrusfs.control import query

    return _report("scrub pass", query(args.mountpoint, "scrub", timeout=None))


def cmd_replace_node(args: argparse.Namespace) -> int:
    from walrusfs.control import query

    new_dir = os.path.abspath(args.new_dir)
    res = query(args.mountpoint, "replace-node", timeout=300, index=args.index, dir=new_dir)
    warnings = res.get("warnings")
    for warning in warnings if isinstance(warnings, list) else []:
        print(f"warning: {warning}")
    print(
        f"node {args.index} is now {new_dir}; it is rebuilt in the background (see walrusfs status)"
    )
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from walrusfs import fsck

    return fsck.run(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    handlers = {
        "mkfs": cmd_mkfs,
        "mount": cmd_mount,
        "umount": cmd_umount,
        "status": cmd_status,
        "repair": cmd_repair,
        "scrub": cmd_scrub,
        "replace-node": cmd_replace_node,
        "fsck": cmd_fsck,
    }
    if args.command == "demo":
        if args.codec:
            from walrusfs import codec_demo

            return codec_demo.main()
        from walrusfs import demo

        return demo.main()
    if args.command not in handlers:
        parser.print_help(sys.stderr)
        return 2
    if args.command in ("status", "fsck"):
        # Their output piped into `head`: end quietly, as other tools do, not with an
        # error about a broken pipe. (Not the server: a client gone must not stop it.)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    from walrusfs.checkpoint import RecoveryError
    from walrusfs.control import ControlError
    from walrusfs.errors import FSError
    from walrusfs.lock import MountLockError
    from walrusfs.volume import VolumeError

    expected = (VolumeError, MountLockError, RecoveryError, ControlError, FSError, OSError)
    try:
        return handlers[args.command](args)
    except expected as exc:
        print(f"walrusfs: error: {message_of(exc)}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Nurseries nest: a flush failing at unmount arrives two groups deep.
        leaves = leaves_of(group)
        if leaves and all(isinstance(x, expected) for x in leaves):
            print(f"walrusfs: error: {message_of(leaves[0])}", file=sys.stderr)
            return 1
        raise


def mount_helper(argv: list[str] | None = None) -> int:
    """`mount.walrusfs NODE_DIR MOUNTPOINT [-o opt,...]`, as mount(8) calls it.

    Options: node=INDEX=DIR (repeatable), allow_other, state_dir=DIR, node_timeout=S,
    cache_size=SIZE, commit=S;
    generic ones mount(8) passes (rw, defaults, _netdev, ...) are ignored.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: mount.walrusfs NODE_DIR MOUNTPOINT [-o options]", file=sys.stderr)
        return 2
    node_dir, mountpoint, rest = argv[0], argv[1], argv[2:]
    cli = ["mount"]
    while rest:
        flag = rest.pop(0)
        if flag == "-o" and rest:
            for opt in rest.pop(0).split(","):
                key, _, value = opt.partition("=")
                if key == "node":
                    cli += ["--node", value]
                elif key == "allow_other":
                    cli.append("--allow-other")
                elif key == "state_dir":
                    cli += ["--state-dir", value]
                elif key == "node_timeout":
                    cli += ["--node-timeout", value]
                elif key == "cache_size":
                    cli += ["--cache-size", value]
                elif key == "commit":
                    cli += ["--commit", value]
    return main([*cli, node_dir, mountpoint])


if __name__ == "__main__":
    sys.exit(main())
