"""How a badmount misbehaves, and the control socket that changes it while it runs.

A ``Behaviour`` is a small JSON-able record; the ``Gate`` applies it to every FUSE request
before the request touches the source directory:

1. hang     - the request waits until the behaviour changes (then it goes on under the new
              one: ``set --ok`` lets every hung request complete normally);
2. latency  - sleep this many milliseconds;
3. throughput - read and write bytes pass through one token bucket of this many KiB/s;
4. eio      - fail with EIO with this probability (a seeded random.Random, so a run repeats);
5. enospc   - writes, creates and mkdirs fail with ENOSPC, and statfs reports no free space.

``ops``, if set, limits hang/latency/eio to those operations (e.g. only ``read``).
Cleanup requests (release, releasedir, forget) are never delayed or failed: the kernel
does not wait for them and they must free what they hold.

Control protocol: a Unix stream socket, one JSON object per line each way:

    {"op": "status"}                       -> {"ok": true, "behaviour": {...}, "stats": {...}}
    {"op": "set", "behaviour": {...}}      -> {"ok": true, "behaviour": {...}, "was": {...}}
    {"op": "exit"}                         -> {"ok": true}   (releases hung requests, unmounts)

It is served by a task of the badmount process's own trio loop; hung FUSE requests only
await an event there, so the control path always answers. Runs in one trio run; not
thread-safe.
"""

from __future__ import annotations

import errno
import json
import random
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

OPS = [
    "lookup",
    "getattr",
    "setattr",
    "opendir",
    "readdir",
    "fsyncdir",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "fsync",
    "mkdir",
    "rmdir",
    "unlink",
    "rename",
    "statfs",
    "readlink",
    "symlink",
    "link",
]
# Operations that allocate space: these fail under enospc.
SPACE_OPS = frozenset({"write", "create", "mkdir", "symlink", "link"})
MAX_LINE = 1 << 16


class FaultError(Exception):
    """A request the gate decided to fail; ``errno`` is what the caller sees."""

    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.errno = code


@dataclass(frozen=True)
class Behaviour:
    """What the mount does to requests; all defaults = a well-behaved passthrough."""

    latency_ms: float = 0.0
    hang: bool = False
    eio: float = 0.0
    enospc: bool = False
    throughput_kbps: float = 0.0  # 0 = unlimited
    ops: tuple[str, ...] = ()  # () = every operation
    seed: int = 0

    @classmethod
    def from_json(cls, doc: object) -> Behaviour:
        """Validate a behaviour document; raises ValueError saying what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("behaviour must be a JSON object")
        unknown = set(doc) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown behaviour fields: {sorted(unknown)}")
        b = cls(
            latency_ms=float(doc.get("latency_ms", 0.0)),
            hang=bool(doc.get("hang", False)),
            eio=float(doc.get("eio", 0.0)),
            enospc=bool(doc.get("enospc", False)),
            throughput_kbps=float(doc.get("throughput_kbps", 0.0)),
            ops=tuple(doc.get("ops") or ()),
            seed=int(doc.get("seed", 0)),
        )
        if b.latency_ms < 0 or b.throughput_kbps < 0:
            raise ValueError("latency and throughput must not be negative")
        if not 0.0 <= b.eio <= 1.0:
            raise ValueError("eio must be a fraction between 0 and 1")
        bad = [op for op in b.ops if op not in OPS]
        if bad:
            raise ValueError(f"unknown operations {bad}; known: {', '.join(OPS)}")
        return b

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ops"] = list(self.ops)
        return doc

    def describe(self) -> str:
        parts = []
        if self.hang:
            parts.append("hang")
        if self.latency_ms:
            parts.append(f"latency {self.latency_ms:g} ms")
        if self.throughput_kbps:
            parts.append(f"throughput {self.throughput_kbps:g} KiB/s")
        if self.eio:
            parts.append(f"eio {self.eio:g} (seed {self.seed})")
        if self.enospc:
            parts.append("enospc")
        if not parts:
            return "ok"
        return ", ".join(parts) + (f" on {','.join(self.ops)}" if self.ops else "")

    def targets(self, op: str) -> bool:
        return not self.ops or op in self.ops


@dataclass
class Stats:
    requests: int = 0
    hung_now: int = 0
    hung_total: int = 0
    eio_injected: int = 0
    enospc_injected: int = 0
    changes: int = 0
    internal_errors: int = 0  # requests that failed because of a bug in badmount itself
    by_op: dict[str, int] = field(default_factory=dict)


class Gate:
    """Applies the current Behaviour to each request (see the module docstring)."""

    def __init__(self, behaviour: Behaviour | None = None, log: Callable[[str], None] = print):
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self._rng = random.Random(self.behaviour.seed)
        self._changed = trio.Event()
        self._bucket = 0.0  # trio time at which the throughput bucket is next free
        self._log = log

    def set(self, behaviour: Behaviour) -> Behaviour:
        """Switch behaviour; wakes every hung request to look again. Returns the old one."""
        old, self.behaviour = self.behaviour, behaviour
        self._rng = random.Random(behaviour.seed)
        self.stats.changes += 1
        self._changed.set()
        self._changed = trio.Event()
        self._log(f"behaviour: {behaviour.describe()} (was {old.describe()})")
        return old

    async def enter(self, op: str, nbytes: int = 0) -> None:
        """Delay or fail one request as the behaviour says; raises FaultError."""
        self.stats.requests += 1
        self.stats.by_op[op] = self.stats.by_op.get(op, 0) + 1
        while self.behaviour.hang and self.behaviour.targets(op):
            self.stats.hung_now += 1
            self.stats.hung_total += 1
            try:
                await self._changed.wait()
            finally:
                self.stats.hung_now -= 1
        b = self.behaviour
        if b.latency_ms and b.targets(op):
            await trio.sleep(b.latency_ms / 1000)
        if b.throughput_kbps and nbytes:
            # One bucket for all requests: concurrent readers share the bandwidth.
            now = trio.current_time()
            self._bucket = max(self._bucket, now) + nbytes / (b.throughput_kbps * 1024)
            await trio.sleep_until(self._bucket)
        if b.eio and b.targets(op) and self._rng.random() < b.eio:
            self.stats.eio_injected += 1
            raise FaultError(errno.EIO)
        if b.enospc and op in SPACE_OPS:
            self.stats.enospc_injected += 1
            raise FaultError(errno.ENOSPC)


class ControlServer:
    """Serves the control protocol on a Unix socket for one Gate."""

    def __init__(self, gate: Gate, path: str, info: dict[str, Any], on_exit: Callable[[], None]):
        self.gate = gate
        self.path = path
        self.info = info
        self.on_exit = on_exit

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(10):
                    line = await _read_line(stream)
                reply = self.answer(json.loads(line))
            except Exception as exc:  # a bad request must not take the server down
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            exiting = reply.pop("_exit", False)
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                pass
        if exiting:
            self.on_exit()

    def answer(self, request: object) -> dict[str, Any]:
        """The reply to one request (raises ValueError for a bad one)."""
        if not isinstance(request, dict):
            raise ValueError("request must be a JSON object")
        op = request.get("op")
        if op == "status":
            return {"ok": True, **self.info, **self._state()}
        if op == "set":
            old = self.gate.set(Behaviour.from_json(request.get("behaviour", {})))
            return {"ok": True, "was": old.to_json(), **self._state()}
        if op == "exit":
            return {"ok": True, "_exit": True}
        raise ValueError(f"unknown op {op!r}; want status, set or exit")

    def _state(self) -> dict[str, Any]:
        return {
            "behaviour": self.gate.behaviour.to_json(),
            "describe": self.gate.behaviour.describe(),
            "stats": asdict(self.gate.stats),
        }


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]


def request(path: str, doc: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a control socket and return the reply (blocking client).

    Raises OSError (no such socket, refused, timed out) or ValueError (bad reply).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(doc).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf.split(b"\n", 1)[0] or b"null")
    if not isinstance(reply, dict):
        raise ValueError("the control socket sent no reply")
    return reply
