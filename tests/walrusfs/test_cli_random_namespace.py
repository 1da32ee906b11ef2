"""Random namespace changes on a real CLI mount, checked against a model across remounts.

create, write, rename (over files, over another name of the same file, whole trees),
link, unlink, mkdir, rmdir, symlink and chmod, at random in a small tree, so that names
collide often; after each remount the whole tree, every file's bytes and mode and every
symlink's target must be as the model says, and fsck must find the volume clean.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from tests.walrusfs.clivol import Vol, run

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


class Tree:
    """The model: path -> ("d", "") | ("f", file id) | ("l", target), and each file's
    bytes and mode (hard links share a file id)."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.names: dict[str, tuple[str, int | str]] = {"": ("d", "")}
        self.data: dict[int, bytearray] = {}
        self.modes: dict[int, int] = {}
        self.log: list[tuple[str, str]] = []

    def of(self, kind: str) -> list[str]:
        return [p for p, v in self.names.items() if v[0] == kind]

    def new_name(self) -> str:
        parent = self.rng.choice(self.of("d"))
        return os.path.join(parent, self.rng.choice("abcde") + str(self.rng.randrange(4)))

    def path(self, name: str) -> Path:
        return self.root / name

    def check(self, where: str) -> None:
        seen = set()
        for top, dirs, files in os.walk(self.root):
            rel = os.path.relpath(top, self.root)
            seen |= {os.path.normpath(os.path.join(rel, x)) for x in dirs + files}
        want = {p for p in self.names if p}
        assert seen == want, (where, sorted(seen ^ want)[:8], self.log[-8:])
        for name, v in self.names.items():
            if v[0] == "f":
                fid = int(v[1])
                assert self.path(name).read_bytes() == self.data[fid], (where, name)
                mode = stat.S_IMODE(os.lstat(self.path(name)).st_mode)
                assert mode == self.modes[fid], (where, name, oct(mode))
            elif v[0] == "l":
                assert os.readlink(self.path(name)) == v[1], (where, name)


def step(t: Tree, op: str) -> None:
    rng = t.rng
    if op == "create":
        name = t.new_name()
        if name in t.names:
            return
        data = rng.randbytes(rng.choice([0, 10, 5000, 70_000, 200_000]))
        t.path(name).write_bytes(data)
        fid = len(t.data)
        t.data[fid] = bytearray(data)
        t.modes[fid] = stat.S_IMODE(os.lstat(t.path(name)).st_mode)
        t.names[name] = ("f", fid)
    elif op == "write" and t.of("f"):
        name = rng.choice(t.of("f"))
        buf = t.data[int(t.names[name][1])]
        off, data = rng.randrange(len(buf) + 1000), rng.randbytes(rng.randrange(1, 100_000))
        with open(t.path(name), "r+b") as f:
            f.seek(off)
            f.write(data)
        buf.extend(bytes(max(0, off - len(buf))))
        buf[off : off + len(data)] = data
    elif op == "rename" and len(t.names) > 1:
        src, dst = rng.choice([p for p in t.names if p]), t.new_name()
        if dst == src or dst.startswith(src + "/"):
            return
        if dst in t.names and "d" in (t.names[src][0], t.names[dst][0]):
            return
        os.rename(t.path(src), t.path(dst))
        if t.names.get(dst) == t.names[src] and t.names[src][0] == "f":
            op = "rename onto another name of the same file: nothing happens"
        else:
            moved = {p: v for p, v in t.names.items() if p == src or p.startswith(src + "/")}
            for p in moved:
                del t.names[p]
            t.names.update({dst + p[len(src) :]: v for p, v in moved.items()})
        name = f"{src} -> {dst}"
    elif op == "link" and t.of("f"):
        src, dst = rng.choice(t.of("f")), t.new_name()
        if dst in t.names:
            return
        os.link(t.path(src), t.path(dst))
        t.names[dst] = t.names[src]
        name = dst
    elif op == "unlink" and t.of("f") + t.of("l"):
        name = rng.choice(t.of("f") + t.of("l"))
        os.unlink(t.path(name))
        del t.names[name]
    elif op == "mkdir":
        name = t.new_name()
        if name in t.names:
            return
        os.mkdir(t.path(name))
        t.names[name] = ("d", "")
    elif op == "rmdir":
        empty = [d for d in t.of("d") if d and not any(p.startswith(d + "/") for p in t.names)]
        if not empty:
            return
        name = rng.choice(empty)
        os.rmdir(t.path(name))
        del t.names[name]
    elif op == "symlink":
        name, target = t.new_name(), f"target-{rng.randrange(100)}"
        if name in t.names:
            return
        os.symlink(target, t.path(name))
        t.names[name] = ("l", target)
    elif op == "chmod" and t.of("f"):
        name, mode = rng.choice(t.of("f")), rng.choice([0o600, 0o640, 0o755, 0o444])
        os.chmod(t.path(name), mode)
        t.modes[int(t.names[name][1])] = mode
    else:
        return
    t.log.append((op, name))


OPS = ["create", "write", "rename", "link", "unlink", "mkdir", "rmdir", "symlink", "chmod"]
WEIGHTS = [20, 15, 15, 8, 10, 8, 5, 6, 6]


def test_random_namespace_changes_match_a_model_across_remounts(vol: Vol) -> None:
    vol.mount()
    t = Tree(vol.mnt, random.Random(7))
    for remount in range(3):
        for _ in range(250):
            step(t, t.rng.choices(OPS, WEIGHTS)[0])
        t.check("before unmounting")
        run("umount", vol.mnt)
        vol.mount()
        t.check(f"after remount {remount + 1}")
    assert any(op.startswith("rename onto") for op, _ in t.log)  # the rule was exercised
    run("umount", vol.mnt)
    res = run("fsck", vol.nodes[0], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
