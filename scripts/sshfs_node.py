#!/usr/bin/env python3
"""sshfs_node.py - put one walrusfs node on a real remote mount (sshfs over a private sshd).

A node on a network mount fails in ways a local directory never does: the mount drops and
leaves the bare directory underneath (where nothing must be written), or the client dies
and leaves a dead mount answering ENOTCONN. This script makes such a node on one machine:

    sshfs_node.py up BACKING_DIR NODE_DIR    start a private sshd, sshfs BACKING_DIR on NODE_DIR
    sshfs_node.py drop NODE_DIR [--how {unmount,kill}]
                                             unmount (the bare directory is back), or kill the
                                             sshfs client (a dead mount: ENOTCONN)
    sshfs_node.py reconnect NODE_DIR         mount again (restarting sshd if it died)
    sshfs_node.py status NODE_DIR            is it mounted, is sshd alive
    sshfs_node.py down NODE_DIR              unmount, stop sshd, remove the throwaway keys

`up` leaves the system's sshd configuration alone: it generates a throwaway host key and
client key in a private temp directory, writes an sshd_config there (127.0.0.1 only, a free
port, key login for the current user only, internal-sftp), and runs
``/usr/sbin/sshd -D -f <that config>`` as a background process; the client trusts exactly
that host key. The only system change is creating /run/sshd (sshd's privilege-separation
directory) if it is missing. State lives in ``.walrusfs-sshfs-<name>.json`` beside the
node directory, so every command works from a new process.

Needs the Debian packages openssh-server and sshfs. Exit codes: 0 done, 1 failed, 2 bad
usage or the packages are missing. Every command takes --json.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from faultlib import mounts, procs, state
from faultlib.cli import Reporter, ScriptError, UsageError, add_json, dispatcher, run_main

PROG = "sshfs_node.py"
SSHD = "/usr/sbin/sshd"
PACKAGES = "openssh-server and sshfs (apt-get install -y openssh-server sshfs)"


def _require_tools() -> None:
    missing = [t for t in ("sshfs", "ssh-keygen", "fusermount3") if shutil.which(t) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        raise UsageError(f"missing {', '.join(missing)}: install the Debian packages {PACKAGES}")


def _load(node: str) -> dict[str, Any]:
    try:
        doc = state.load(state.state_file(node, "sshfs"))
    except ValueError as exc:
        raise ScriptError(str(exc)) from None
    if doc is None:
        raise ScriptError(f"{node}: not an sshfs node (no `{PROG} up` recorded for it)")
    return doc


def _save(node: str, doc: dict[str, Any]) -> None:
    state.save(state.state_file(node, "sshfs"), doc)


def _run(cmd: list[str]) -> None:
    res = procs.run(cmd)
    if res.returncode != 0:
        raise ScriptError(f"{' '.join(cmd)}: {res.stderr.strip() or f'exit {res.returncode}'}")


# -- sshd ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_keys(tmp: str, out: Reporter) -> None:
    for name in ("host_key", "client_key"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"walrusfs-{name}", "-f",
              os.path.join(tmp, name)])  # fmt: skip
    with open(os.path.join(tmp, "client_key.pub"), encoding="ascii") as f:
        client = f.read().strip()
    with open(os.path.join(tmp, "authorized_keys"), "w", encoding="ascii") as f:
        # "restrict": no pty, no forwarding; the sftp subsystem still works.
        f.write(f"restrict {client}\n")
    out.action(f"generated throwaway host and client keys in {tmp}", action="keys", dir=tmp)


def _write_config(tmp: str, port: int) -> str:
    config = os.path.join(tmp, "sshd_config")
    with open(config, "w", encoding="ascii") as f:
        f.write(
            f"ListenAddress 127.0.0.1\nPort {port}\n"
            f"HostKey {tmp}/host_key\nPidFile {tmp}/sshd.pid\n"
            f"AuthorizedKeysFile {tmp}/authorized_keys\n"
            f"AllowUsers {getpass.getuser()}\n"
            "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            # The keys live in a private temp dir under world-writable /tmp.
            "StrictModes no\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
        )
    with open(os.path.join(tmp, "host_key.pub"), encoding="ascii") as f:
        host = f.read().split()
    with open(os.path.join(tmp, "known_hosts"), "w", encoding="ascii") as f:
        f.write(f"[127.0.0.1]:{port} {host[0]} {host[1]}\n")
    return config


def _start_sshd(doc: dict[str, Any], out: Reporter) -> None:
    """Start sshd on doc's port (a new free one if taken); wait until it answers."""
    tmp = doc["tmpdir"]
    if not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        out.action("created /run/sshd (sshd's privilege-separation directory)", action="mkdir")
    for attempt in range(3):
        # Reuse the recorded port first (a restart after a crash), else a fresh free one.
        port = int(doc["port"]) if attempt == 0 and doc.get("port") else _free_port()
        config = _write_config(tmp, port)
        with open(os.path.join(tmp, "sshd.log"), "ab") as log:
            child = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, start_new_session=True,
            )  # fmt: skip
        if _wait_banner(port, child):
            doc.update(port=port, sshd_pid=child.pid, sshd_start=procs.start_time(child.pid))
            out.action(f"started sshd on 127.0.0.1:{port} (pid {child.pid})", action="sshd",
                       port=port, pid=child.pid)  # fmt: skip
            return
        procs.stop(child.pid, None)
    raise ScriptError(f"sshd would not start: {_tail(os.path.join(tmp, 'sshd.log'))}")


def _wait_banner(port: int, child: subprocess.Popen[bytes], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


# -- sshfs ---------------------------------------------------------------------------------


def _mount(doc: dict[str, Any], out: Reporter) -> None:
    tmp, node = doc["tmpdir"], doc["node"]
    opts = [
        f"port={doc['port']}",
        f"IdentityFile={tmp}/client_key",
        "IdentitiesOnly=yes",
        f"UserKnownHostsFile={tmp}/known_hosts",
        "StrictHostKeyChecking=yes",
        "BatchMode=yes",
        "ServerAliveInterval=5",
        "ServerAliveCountMax=3",
        "dir_cache=no",  # others (faults.py) change the backing dir behind sshfs's back
        "default_permissions",
    ]
    if os.geteuid() == 0:
        opts.append("allow_other")
    remote = f"{getpass.getuser()}@127.0.0.1:{doc['backing']}"
    with open(os.path.join(tmp, "sshfs.log"), "ab") as log:
        child = subprocess.Popen(
            ["sshfs", "-f", remote, node, "-o", ",".join(opts)], stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        mounts.wait_mounted(node, 20, "fuse.sshfs", alive=lambda: child.poll() is None)
    except (TimeoutError, RuntimeError) as exc:
        procs.stop(child.pid, None)
        raise ScriptError(
            f"sshfs did not mount {node}: {exc}; {_tail(tmp + '/sshfs.log')}"
        ) from None
    doc.update(mounted=True, sshfs_pid=child.pid, sshfs_start=procs.start_time(child.pid))
    out.action(f"mounted {remote} on {node} (sshfs pid {child.pid})", action="mount",
               node=node, remote=remote, pid=child.pid)  # fmt: skip


def _unmount(doc: dict[str, Any], out: Reporter) -> None:
    node = doc["node"]
    for step in mounts.unmount_all(node, abort_hung=False) if _sshfs_mounted(node) else []:
        out.action(step, action="unmount", node=node)
    pid, started = doc.get("sshfs_pid"), doc.get("sshfs_start")
    if pid and procs.alive(pid, started):
        # The client exits by itself once unmounted; give it a moment, then insist.
        deadline = time.monotonic() + 5
        while procs.alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.02)
        if procs.alive(pid, started):
            out.action(f"sshfs pid {pid} {procs.stop(pid, started)}", action="stop", pid=pid)
    doc.update(mounted=False, sshfs_pid=None, sshfs_start=None)


def _sshfs_mounted(node: str) -> bool:
    return any(m.fstype == "fuse.sshfs" for m in mounts.at(node))


# -- commands ------------------------------------------------------------------------------


def up(args: argparse.Namespace, out: Reporter) -> None:
    _require_tools()
    node = state.node_path(args.node_dir)
    backing = os.path.realpath(args.backing_dir)
    if state.load(state.state_file(node, "sshfs")) is not None:
        raise UsageError(f"{node} is already an sshfs node; `{PROG} down` it first")
    if not os.path.isdir(backing):
        raise UsageError(f"{args.backing_dir}: no such directory")
    if mounts.top(node) is not None:
        raise UsageError(f"{node} is already a mount point")
    os.makedirs(node, mode=0o700, exist_ok=True)
    if os.listdir(node):
        # The bare directory must stay empty: that is how a dropped mount is recognized.
        raise UsageError(f"{node} is not empty; sshfs would hide what is in it")
    tmp = tempfile.mkdtemp(prefix="walrusfs-sshfs-")
    doc: dict[str, Any] = {"node": node, "backing": backing, "tmpdir": tmp, "mounted": False}
    try:
        _make_keys(tmp, out)
        _start_sshd(doc, out)
        _save(node, doc)
        _mount(doc, out)
    except BaseException:
        _teardown(doc, out)
        raise
    _save(node, doc)
    out.result(**doc)


def drop(args: argparse.Namespace, out: Reporter) -> None:
    node = state.node_path(args.node_dir)
    doc = _load(node)
    if args.how == "kill":
        pid, started = doc.get("sshfs_pid"), doc.get("sshfs_start")
        if not pid or not procs.alive(pid, started):
            raise ScriptError(f"{node}: no sshfs client is running")
        os.kill(pid, signal.SIGKILL)
        out.action(f"killed sshfs pid {pid}: {node} is now a dead mount (ENOTCONN)",
                   action="kill", pid=pid)  # fmt: skip
        doc.update(sshfs_pid=None, sshfs_start=None)  # mounted stays True: the dead mount
    else:
        if not _sshfs_mounted(node):
            raise ScriptError(f"{node}: not mounted")
        _unmount(doc, out)
    _save(node, doc)
    out.result(**doc)


def reconnect(args: argparse.Namespace, out: Reporter) -> None:
    _require_tools()
    node = state.node_path(args.node_dir)
    doc = _load(node)
    if _sshfs_mounted(node):
        if doc.get("sshfs_pid") and procs.alive(doc["sshfs_pid"], doc.get("sshfs_start")):
            raise ScriptError(f"{node}: already mounted and its client is alive")
        _unmount(doc, out)  # a dead mount from `drop --how kill` or a crash
    if not procs.alive(doc.get("sshd_pid") or 0, doc.get("sshd_start")):
        _start_sshd(doc, out)
    _mount(doc, out)
    _save(node, doc)
    out.result(**doc)


def status(args: argparse.Namespace, out: Reporter) -> None:
    node = state.node_path(args.node_dir)
    doc = _load(node)
    info = {
        "node": node,
        "backing": doc["backing"],
        "mounted": _sshfs_mounted(node),
        "client_alive": bool(doc.get("sshfs_pid"))
        and procs.alive(doc["sshfs_pid"], doc.get("sshfs_start")),
        "sshd_alive": procs.alive(doc.get("sshd_pid") or 0, doc.get("sshd_start")),
        "port": doc.get("port"),
    }
    if not out.as_json:
        print(
            f"{node}: {'mounted' if info['mounted'] else 'not mounted'}, client "
            f"{'alive' if info['client_alive'] else 'not running'}, sshd on port {info['port']} "
            f"{'alive' if info['sshd_alive'] else 'not running'}, backing {doc['backing']}"
        )
    out.result(**info)


def down(args: argparse.Namespace, out: Reporter) -> None:
    node = state.node_path(args.node_dir)
    doc = _load(node)
    _teardown(doc, out)
    state.remove(state.state_file(node, "sshfs"))
    out.result(node=node)


def _teardown(doc: dict[str, Any], out: Reporter) -> None:
    """Unmount, stop sshd, remove the keys; every step is attempted."""
    _unmount(doc, out)
    pid = doc.get("sshd_pid")
    if pid:
        what = procs.stop(pid, doc.get("sshd_start"))
        out.action(f"sshd pid {pid} {what}", action="sshd-stop", pid=pid, result=what)
    if doc.get("tmpdir") and os.path.isdir(doc["tmpdir"]):
        shutil.rmtree(doc["tmpdir"], ignore_errors=True)
        out.action(f"removed {doc['tmpdir']}", action="remove", path=doc["tmpdir"])


# -- arguments -----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Exit codes: 0 done, 1 failed, 2 bad usage or missing packages. Needs {PACKAGES}.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "up",
        help="start a private sshd and sshfs BACKING_DIR onto NODE_DIR",
        description="Generate throwaway keys, run a private sshd on 127.0.0.1 and mount "
        "BACKING_DIR on NODE_DIR (created if missing; must be empty) with sshfs.",
    )
    p.add_argument("backing_dir", metavar="BACKING_DIR")
    p.add_argument("node_dir", metavar="NODE_DIR")
    add_json(p)
    p = sub.add_parser(
        "drop",
        help="lose the mount (unmount, or kill the client)",
        description="unmount: the mount goes away and NODE_DIR is the bare directory again. "
        "kill: the sshfs client is killed, leaving a dead mount that answers ENOTCONN.",
    )
    p.add_argument("node_dir", metavar="NODE_DIR")
    p.add_argument("--how", choices=("unmount", "kill"), default="unmount")
    add_json(p)
    for name, text in (
        ("reconnect", "mount again after drop (restarts sshd if it died)"),
        ("status", "show whether the node is mounted and sshd alive"),
        ("down", "unmount, stop sshd, remove the throwaway keys and state"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("node_dir", metavar="NODE_DIR")
        add_json(p)
    return top


COMMANDS = {"up": up, "drop": drop, "reconnect": reconnect, "status": status, "down": down}


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, parser(), argv, dispatcher(COMMANDS))


if __name__ == "__main__":
    sys.exit(main())
