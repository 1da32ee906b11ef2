"""The control socket of a running mount: how `walrusfs status MOUNTPOINT` reaches it.

One Unix socket per mount, at a path derived from the mountpoint's real path, under
/run/walrusfs (root) or $XDG_RUNTIME_DIR/walrusfs (or /tmp/walrusfs-UID), mode 0600 so
only the mounting user can ask. Protocol: the client sends one JSON line {"cmd": ...},
the server answers one JSON line and closes. Commands: "status", "repair", "scrub" (run a
pass and return its report), "replace-node" (with "index" and "dir") and "blobs-of" (with
"path" inside the mount: the blob ids of that file, for the fault tools). Beside the
socket the mount leaves, when it ends, whether everything was stored (`take_outcome`),
for `walrusfs umount` to report.

The server runs in the mount's trio nursery; the client is plain blocking code for the CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from walrusfs.errors import is_known, message_of

log = logging.getLogger(__name__)


class ControlError(Exception):
    """No mount answers at that mountpoint."""


def socket_dir() -> str:
    if os.geteuid() == 0:
        return "/run/walrusfs"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "walrusfs") if runtime else f"/tmp/walrusfs-{os.geteuid()}"


def real_mountpoint(path: str) -> str:
    """The real path of a mountpoint, found without a stat of the mountpoint itself.

    os.path.realpath stats every component, the last one included: on a mount whose
    server does not answer (stuck on a hung node, or killed while it was), that stat
    waits for ever. The parent is resolved as usual; the last component is followed
    only if it is a symlink, which readlink tells without asking the mount. Blocking.
    """
    for _hop in range(40):  # as the kernel's own limit on symlinks followed
        parent, name = os.path.split(os.path.abspath(path))
        if not name:
            return parent  # "/"
        path = os.path.join(os.path.realpath(parent), name)
        try:
            target = os.readlink(path)
        except OSError:
            return path  # not a symlink (EINVAL), or not there
        path = os.path.join(os.path.dirname(path), target)
    return os.path.realpath(path)  # a loop: let realpath say what it makes of it


def socket_path(mountpoint: str) -> str:
    """Where the mount at `mountpoint` listens (blocking: resolves the path)."""
    digest = hashlib.sha256(real_mountpoint(mountpoint).encode()).hexdigest()[:20]
    return os.path.join(socket_dir(), f"{digest}.sock")


def outcome_path(mountpoint: str) -> str:
    """Where the mount at `mountpoint` says how its unmount ended (blocking)."""
    return socket_path(mountpoint).removesuffix(".sock") + ".exit"


def clear_outcome(mountpoint: str) -> None:
    """Forget how an earlier mount at `mountpoint` ended (a mount starts). Blocking."""
    _remove(outcome_path(mountpoint))


def write_outcome(mountpoint: str, outcome: str | None) -> None:
    """Record how the unmount ended: None when everything was stored, else why not.
    Blocking; never raises."""
    path = outcome_path(mountpoint)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("ok\n" if outcome is None else f"error: {outcome}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record how the unmount ended at %s: %s", path, exc)


def take_outcome(mountpoint: str) -> str | None:
    """What the mount recorded when it ended ("ok" or "error: ..."), removing it; None if
    it recorded nothing (it crashed, or was not a walrusfs mount)."""
    path = outcome_path(mountpoint)
    try:
        with open(path) as f:
            text = f.read().strip()
        os.unlink(path)
    except OSError:
        return None
    return text or None


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def _prepare(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a crashed mount: the lock already told us it is gone


Handler = Callable[[dict[str, object]], Awaitable[dict[str, object]]]


class CommandError(Exception):
    """A command failed in a way to report to the client (not a server fault)."""


async def serve_control(
    mountpoint: str,
    handle_request: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer control requests until cancelled."""
    path = await trio.to_thread.run_sync(socket_path, mountpoint)
    await trio.to_thread.run_sync(_prepare, path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    await trio.to_thread.run_sync(os.chmod, path, 0o600)
    sock.listen(8)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                raw = b""
                with trio.move_on_after(5):
                    raw = await stream.receive_some(65536)
                request = json.loads(raw or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                try:
                    reply: dict[str, object] = {"ok": True, "result": await handle_request(request)}
                except CommandError as exc:
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:
                    # A status, repair or scrub that fails must not take the mount with it:
                    # this task runs in the mount's nursery.
                    known = is_known(exc)
                    log.log(
                        logging.WARNING if known else logging.ERROR,
                        "control request %r failed: %s",
                        request.get("cmd"),
                        message_of(exc),
                        exc_info=None if known else exc,
                    )
                    reply = {"ok": False, "error": f"failed: {message_of(exc)} (see the log)"}
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (trio.BrokenResourceError, ValueError) as exc:
                log.debug("control request failed: %s", exc)

    try:
        async with listener:
            task_status.started()
            await trio.serve_listeners(handle, [listener])
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_remove, path)


def query(
    mountpoint: str, cmd: str = "status", timeout: float | None = 10.0, **args: object
) -> dict[str, object]:
    """Ask the mount at `mountpoint`; raises ControlError if none answers or it refuses."""
    path = socket_path(mountpoint)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(f"{mountpoint}: no walrusfs mount answers there") from exc
    except OSError as exc:
        raise ControlError(
            f"{mountpoint}: the mount did not answer ({exc.strerror or exc})"
        ) from exc
    if not data:
        raise ControlError(f"{mountpoint}: the mount closed the connection without answering")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    return dict(reply["result"])
