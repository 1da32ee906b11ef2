"""`./run demo` (`walrusfs demo`): a demo volume a newcomer can poke at.

Creates 7 node directories under ./demo, makes a volume (f=2), mounts it at ./demo/mnt,
copies sample files in, unmounts, takes 2 node directories away, mounts again and shows
every file still reads back byte for byte, brings them back, and leaves the volume mounted
with instructions.
Every step runs the real `walrusfs` command, printed as a user would type it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path.cwd() / "demo"
NODES = [ROOT / "nodes" / f"node{i}" for i in range(7)]
MNT = ROOT / "mnt"


def sh(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    shown = " ".join(str(a).replace(str(Path.cwd()) + "/", "") for a in argv)
    print(f"$ {shown}", flush=True)
    res = subprocess.run([str(a) for a in argv], text=True, capture_output=True)
    out = (res.stdout + res.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if check and res.returncode:
        raise SystemExit(f"demo: `{shown}` failed ({res.returncode})")
    return res


def walrusfs(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-m", "walrusfs.cli", *args, check=check)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def samples() -> dict[str, bytes]:
    repo = Path(__file__).resolve().parent.parent
    files = {f"src/{p.relative_to(repo)}": p.read_bytes() for p in sorted(repo.glob("*/*.py"))}
    files["README.md"] = (repo / "README.md").read_bytes()
    files["random-12MiB.bin"] = os.urandom(12 << 20)
    files["empty"] = b""
    return files


def mounted() -> bool:
    return f" {MNT} " in Path("/proc/mounts").read_text()


def main() -> int:
    if mounted():  # an earlier demo is still mounted
        walrusfs("umount", MNT, check=False)
        if mounted():  # its server is gone or hung: detach it
            sh("fusermount3", "-u", "-z", MNT, check=False)
    shutil.rmtree(ROOT, ignore_errors=True)
    MNT.mkdir(parents=True)
    print("== a volume over 7 node directories (any 2 may fail)")
    walrusfs("mkfs", *NODES)
    walrusfs("mount", NODES[0], MNT)
    print("== copy sample files in")
    files = samples()
    for name, data in files.items():
        dst = MNT / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
    print(f"  wrote {len(files)} files, {sum(map(len, files.values())) / 2**20:.1f} MiB")
    sh("ls", "-l", MNT)
    away = [NODES[2], NODES[5]]
    print("== unmount, take 2 node directories away (as if two disks were pulled), mount again")
    walrusfs("umount", MNT)  # so nothing can come from a cache: every byte from the nodes
    for node in away:
        sh("mv", node, f"{node}.away")
    walrusfs("mount", NODES[0], MNT)
    bad = [name for name, data in files.items() if (MNT / name).read_bytes() != data]
    print(
        f"  read back {len(files)} files with 2 nodes gone: {'all correct' if not bad else f'WRONG: {bad}'}"
    )
    walrusfs("status", MNT)
    print("== bring them back")
    for node in away:
        sh("mv", f"{node}.away", node)
    print(
        f"""
The volume is mounted at {MNT}. Try:
  cp -r /usr/share/doc/bash {MNT}/      # write files
  walrusfs status {MNT}                  # node states, space, degraded blobs
  mv {NODES[3]} /tmp/away; cat {MNT}/README.md; mv /tmp/away {NODES[3]}
  walrusfs umount {MNT}                  # returns once everything is stored
(walrusfs is .venv/bin/walrusfs)"""
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
