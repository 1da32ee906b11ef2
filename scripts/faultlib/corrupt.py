"""Damaging sliver files the ways disks and people do, reproducibly (seeded), atomically.

Modes (each returns what it did, one sentence per file):

* flip     - flip bits (bit rot);
* truncate - cut the file short (a torn write, a full disk at the wrong moment);
* zero     - overwrite a range with zeros (a lost block, a sparse hole);
* swap     - exchange the contents of two sliver files (misdirected writes);
* foreign  - replace a file by another blob's sliver file under the old name (a restore
             from the wrong backup, a copy onto the wrong path).

Where damage lands (`region`): "header" (the verified header fields), "primary" or
"secondary" (that sliver's bytes), or "all" (the default), which damages *every part a
reader may use*: both slivers, and the header one time in four; a truncation cuts into
the primary sliver (so the secondary is gone too) or, one time in four, into the header.
That way the damage is found whichever sliver of the pair a reader needs, which is what
a user who asks for corruption wants to see proven. The unverified padding and reserved
byte are never touched: damage there is harmless and would prove nothing.

Files are replaced atomically (a temp file ``.tmp-fault-*`` beside it, fsync, rename), so a
concurrent reader sees the old bytes or the new ones, never half of each. Mode, owner
and mtime are kept: bit rot does not update mtime.

Blocking; for scripts. Not thread-safe for the same files.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
from dataclasses import dataclass

from faultlib.slivers import Layout, SliverFile, layout

MODES = ("flip", "truncate", "zero", "swap", "foreign")
REGIONS = ("all", "header", "primary", "secondary")
_TRIES = 32  # attempts to find a change that really changes bytes (zeros over zeros...)


class CorruptError(Exception):
    """The corruption asked for is impossible here (too few files, nothing to change)."""


@dataclass
class Hit:
    """One damaged file and what was done to it."""

    file: SliverFile
    detail: str
    changed: bool = True
    partner: SliverFile | None = None


def write_atomic(path: str, data: bytes, like: os.stat_result) -> None:
    """Replace `path` by `data` atomically, keeping mode, owner and times of `like`."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-fault-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, like.st_mode & 0o7777)
        with contextlib.suppress(PermissionError):
            os.fchown(fd, like.st_uid, like.st_gid)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.utime(tmp, ns=(like.st_atime_ns, like.st_mtime_ns))
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: str) -> tuple[bytes, os.stat_result]:
    with open(path, "rb") as f:
        return f.read(), os.fstat(f.fileno())


def _ranges(lay: Layout, region: str, rng: random.Random) -> list[tuple[int, int]]:
    """The non-empty byte ranges to damage for `region` (see the module docstring)."""
    if region == "all":
        names = ["primary", "secondary"] + (["header"] if rng.random() < 0.25 else [])
    else:
        names = [region]
    ranges = [r for name in names for r in lay.region(name) if r[1] > r[0]]
    if not ranges:
        what = "bytes" if region == "all" else f"{region} bytes"
        raise CorruptError(f"the file has no {what} to damage (cut short before?)")
    return ranges


def _pick(ranges: list[tuple[int, int]], rng: random.Random) -> int:
    """A uniformly random offset inside the union of `ranges`."""
    total = sum(end - start for start, end in ranges)
    k = rng.randrange(total)
    for start, end in ranges:
        if k < end - start:
            return start + k
        k -= end - start
    raise AssertionError("unreachable")


def flip(data: bytes, lay: Layout, region: str, bits: int, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    where = []
    for start, end in _ranges(lay, region, rng):
        for _ in range(bits):
            pos, bit = rng.randrange(start, end), rng.randrange(8)
            out[pos] ^= 1 << bit
            where.append(f"{pos}.{bit}")
    return bytes(out), f"flipped bit(s) at byte.bit {', '.join(where)}"


def truncate(data: bytes, lay: Layout, region: str, rng: random.Random) -> tuple[bytes, str]:
    if region == "all":
        # Cut into the primary: both slivers are damaged (or the header, one time in four).
        region = "header" if rng.random() < 0.25 else "primary"
    ranges = _ranges(lay, region, rng)
    cut = _pick(ranges, rng)
    return data[:cut], f"truncated from {len(data)} to {cut} bytes"


def zero(data: bytes, lay: Layout, region: str, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    where = []
    for start, end in _ranges(lay, region, rng):
        length = rng.randint(1, min(4096, end - start))
        pos = rng.randrange(start, end - length + 1)
        out[pos : pos + length] = bytes(length)
        where.append(f"[{pos}, {pos + length})")
    return bytes(out), f"zeroed bytes {', '.join(where)}"


def damage(
    target: SliverFile,
    mode: str,
    region: str,
    bits: int,
    rng: random.Random,
    identity: dict[str, object] | None,
) -> Hit:
    """Apply an in-place mode (flip, truncate, zero) to one file, retrying until bytes change."""
    data, st = _read(target.path)
    if not data:
        raise CorruptError(f"{target.key}: empty file, nothing to damage")
    lay = layout(data, identity)
    for _ in range(_TRIES):
        if mode == "flip":
            new, detail = flip(data, lay, region, bits, rng)
        elif mode == "truncate":
            new, detail = truncate(data, lay, region, rng)
        else:
            new, detail = zero(data, lay, region, rng)
        if new != data:
            write_atomic(target.path, new, st)
            return Hit(target, detail)
    return Hit(target, f"{mode}: every attempt left the bytes as they were", changed=False)


def swap(a: SliverFile, b: SliverFile) -> Hit:
    """Exchange the contents of two files (each replaced atomically)."""
    data_a, st_a = _read(a.path)
    data_b, st_b = _read(b.path)
    write_atomic(a.path, data_b, st_a)
    write_atomic(b.path, data_a, st_b)
    return Hit(a, f"swapped contents with {b.key}", changed=data_a != data_b, partner=b)


def foreign(target: SliverFile, source: SliverFile) -> Hit:
    """Replace `target`'s contents by those of another blob's sliver file."""
    data, _ = _read(source.path)
    old, st = _read(target.path)
    write_atomic(target.path, data, st)
    return Hit(
        target, f"replaced by the contents of {source.key}", changed=data != old, partner=source
    )


def partner_for(
    target: SliverFile, files: list[SliverFile], avoid: set[str], rng: random.Random
) -> SliverFile:
    """Another blob's sliver file to swap with or copy from (not one already damaged)."""
    others = [f for f in files if f.blob_id != target.blob_id and f.key not in avoid]
    if not others:
        others = [f for f in files if f.blob_id != target.blob_id]
    if not others:
        raise CorruptError(
            f"{target.key}: the node holds no other blob's sliver file to take contents from"
        )
    return rng.choice(others)
