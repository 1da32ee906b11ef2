"""Permissions revoked on f nodes, as an unprivileged user sees it (root bypasses mode bits)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCENARIO = r"""
import json, os, sys, trio
from walrusfs.volume import create_volume, open_volume
from walrusfs.errors import StorageUnavailable

async def main(root):
    paths = [os.path.join(root, f"node{i}") for i in range(7)]
    await create_volume(paths, blob_size=1 << 20)
    vol = await open_volume(paths[0], node_timeout=3.0, hedge_after=0.3)
    data = os.urandom(300_000)
    r = await vol.blobs.put_blob(data)
    for i in (2, 5):
        os.chmod(paths[i], 0)
    ok = bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    r2 = await vol.blobs.put_blob(data[::-1])
    ok2 = bytes(await vol.blobs.get_blob(r2.blob_id, r2.meta)) == data[::-1]
    for i in (1, 3):
        os.chmod(paths[i], 0)
    try:
        await vol.blobs.put_blob(b"too many nodes locked")
        refused = False
    except StorageUnavailable:
        refused = True
    states = [n["state"] for n in vol.nodes.snapshot()]
    for p in paths:
        os.chmod(p, 0o700)
    print(json.dumps({"read": ok, "written": ok2, "missed": list(r2.missed),
                      "refused": refused, "states": states}))

trio.run(main, sys.argv[1])
"""


_AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_chmod_000_on_f_nodes_as_a_normal_user() -> None:
    probe = subprocess.run(
        [*_AS_NOBODY, sys.executable, "-c", "import trio, walrusfs.volume"],
        capture_output=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    if probe.returncode:
        pytest.skip("user nobody cannot read this checkout or its .venv (a parent is private)")
    root = Path(tempfile.mkdtemp(prefix="walrusfs-nobody-"))  # pytest's own tmp is root-only
    os.chown(root, 65534, 65534)
    try:
        res = _run_as_nobody(root)
    finally:
        shutil.rmtree(root)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["read"] and out["written"] and out["refused"]
    assert sorted(out["missed"]) == [2, 5]
    assert [out["states"][i] for i in (2, 5)] == ["down", "down"]
    assert "permission" in res.stderr.lower()  # the state change was logged with its cause


def _run_as_nobody(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            SCENARIO,
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
