#!/usr/bin/env python3
"""faults.py - lose, wipe and corrupt walrusfs node directories, on demand and undoably.

The fault injection a user runs to see walrusfs survive what it claims to survive, and the
same tool the test suite uses. Every command prints one line per action (or, with
--json, one JSON document at the end) and exits 0 (done), 1 (failed; the lines printed
say how far it got) or 2 (bad usage / not supported; nothing changed).

    faults.py take-away NODE_DIR --how {rename,remove,chmod,ro,unmount} [--for-good]
    faults.py restore NODE_DIR
    faults.py wipe NODE_DIR [--everything] [--identity-too]
    faults.py corrupt NODE_DIR --mode {flip,truncate,zero,swap,foreign}
                      [--count K | --fraction F | --blob HEX] [--region R] [--bits N] [--seed S]
    faults.py list NODE_DIR

Losing a node (take-away), as it happens to users:

* rename  - the directory is renamed aside to ``.walrusfs-away-<name>`` (someone mv'd it);
* remove  - it disappears (rm -rf); it is moved into ``.walrusfs-stash/`` beside it so
            restore can bring it back, or deleted for real with --for-good;
* chmod   - mode 000. Root ignores permission bits, so this only affects a walrusfs
            running as another user; for root use:
* ro      - a read-only bind mount over the node directory (permissions revoked, a
            filesystem remounted read-only after errors): reads work, writes fail EROFS;
* unmount - the node directory is a mount point and is lazily unmounted (a dropped NFS or
            disk mount), leaving the bare directory underneath; restore mounts it again
            from the same source (bind source, loop file or device, same options).
            Refused for tmpfs (unmounting loses its contents) and FUSE mounts (their
            server exits: use sshfs_node.py drop / badmount.py unmount instead).

What restore needs is kept in ``.walrusfs-fault-<name>.json`` beside the node directory,
so restore works from a new process, a day later.

Needs the walrusfs package importable (run it with the project's .venv/bin/python).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import sys
import time

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
    from faultlib import corrupt as corruption
    from faultlib import mounts, procs, slivers, state
except ImportError as _exc:  # walrusfs (and numpy, blake3) live in the project's venv
    print(f"faults.py: error: {_exc}; run it with the project's .venv/bin/python", file=sys.stderr)
    sys.exit(EXIT_USAGE)

PROG = "faults.py"
HOWS = ("rename", "remove", "chmod", "ro", "unmount")
_LOSES_CONTENTS = ("tmpfs", "ramfs")


# -- helpers ------------------------------------------------------------------------------


def _node(arg: str) -> str:
    try:
        return state.node_path(arg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _require_node(node: str) -> dict[str, object]:
    """The node's identity; refuses directories that are not walrusfs nodes (a safety net:
    these commands rename, remount and delete)."""
    if not os.path.isdir(node):
        raise UsageError(f"{node}: no such directory")
    ident = slivers.read_identity(node)
    if ident is None or ident.get("format") != "walrusfs-node":
        raise UsageError(f"{node}: not a walrusfs node directory (no readable walrusfs-node.json)")
    return ident


def _run(cmd: list[str]) -> None:
    res = procs.run(cmd)
    if res.returncode != 0:
        raise ScriptError(f"{' '.join(cmd)}: {res.stderr.strip() or f'exit {res.returncode}'}")


def _move(src: str, dst: str) -> None:
    try:
        os.rename(src, dst)
    except OSError as exc:
        hint = " (it is a mount point: use --how unmount)" if exc.errno == 16 else ""
        raise ScriptError(f"cannot move {src} to {dst}: {exc.strerror}{hint}") from None


# -- take-away / restore ------------------------------------------------------------------


def take_away(args: argparse.Namespace, out: Reporter) -> None:
    node = _node(args.node_dir)
    record = state.state_file(node, "fault")
    try:
        earlier = state.load(record)
    except ValueError as exc:
        raise ScriptError(str(exc)) from None
    if earlier is not None:
        raise UsageError(
            f"{node} is already taken away (--how {earlier.get('how')}); run restore first"
        )
    if args.for_good and args.how != "remove":
        raise UsageError("--for-good only goes with --how remove")
    ident = _require_node(node)
    doc: dict[str, object] = {"how": args.how, "node": node, "since": time.time()}
    doc.update(_TAKE[args.how](node, args, out))
    if doc.pop("for_good", False):
        return  # nothing to restore
    state.save(record, doc)
    out.action(f"recorded {record} (restore reads it)", action="record", path=record)
    out.result(node=node, how=args.how, index=ident.get("index"), record=record)


def _take_rename(node: str, args: argparse.Namespace, out: Reporter) -> dict[str, object]:
    away = state.sibling(node, ".walrusfs-away-")
    if os.path.lexists(away):
        raise ScriptError(f"{away} already exists; move it out of the way first")
    _move(node, away)
    out.action(f"renamed {node} -> {away}", action="rename", node=node, to=away)
    return {"away": away}


def _take_remove(node: str, args: argparse.Namespace, out: Reporter) -> dict[str, object]:
    stash_dir = os.path.join(os.path.dirname(node), ".walrusfs-stash")
    if args.for_good:
        # Move aside first so the node path vanishes at once, as with rm -rf, then delete.
        doomed = state.sibling(node, ".walrusfs-deleting-", f"-{secrets.token_hex(4)}")
        _move(node, doomed)
        shutil.rmtree(doomed)
        out.action(f"deleted {node} for good", action="delete", node=node)
        return {"for_good": True}
    os.makedirs(stash_dir, mode=0o700, exist_ok=True)
    stashed = os.path.join(stash_dir, f"{os.path.basename(node)}-{int(time.time())}")
    _move(node, stashed)
    out.action(f"removed {node} (kept in {stashed})", action="remove", node=node, to=stashed)
    return {"away": stashed}


def _take_chmod(node: str, args: argparse.Namespace, out: Reporter) -> dict[str, object]:
    mode = os.stat(node).st_mode & 0o7777
    os.chmod(node, 0)
    out.action(f"chmod 000 {node} (was {mode:04o})", action="chmod", node=node, mode=f"{mode:04o}")
    if os.geteuid() == 0:
        out.note(
            "you are root, and root ignores permission bits: a walrusfs running as root "
            "will not notice; use --how ro for root"
        )
    return {"mode": mode}


def _take_ro(node: str, args: argparse.Namespace, out: Reporter) -> dict[str, object]:
    _run(["mount", "--bind", node, node])
    mount = mounts.top(node)
    try:
        _run(["mount", "-o", "remount,bind,ro", node])
    except ScriptError:
        mounts.lazy_unmount(node)
        raise
    assert mount is not None
    out.action(f"mounted {node} read-only over itself", action="mount-ro", node=node)
    return {"mount_id": mount.mount_id}


def _take_unmount(node: str, args: argparse.Namespace, out: Reporter) -> dict[str, object]:
    table = mounts.read()
    here = [m for m in table if m.point == node]
    if not here:
        raise UsageError(f"{node} is not a mount point; use --how rename, remove or ro")
    mount = here[-1]
    if mount.is_fuse:
        raise UsageError(
            f"{node} is a FUSE mount ({mount.fstype}): its server exits when unmounted and "
            "cannot be remounted from here; use sshfs_node.py drop or badmount.py unmount"
        )
    if mount.fstype in _LOSES_CONTENTS:
        raise UsageError(f"{node} is a {mount.fstype}: unmounting it would lose the node's data")
    how = {
        "fstype": mount.fstype,
        "source": mount.source,
        "read_only": mount.read_only,
        "options": [o for o in mount.options + mount.super_options if o not in ("rw", "ro")],
        "bind_source": mounts.bind_source(mount, table),
        "loop_file": mounts.loop_backing_file(mount.source),
    }
    res = mounts.lazy_unmount(node)
    if res.returncode != 0:
        raise ScriptError(f"umount -l {node}: {res.stderr.strip()}")
    out.action(
        f"unmounted {node} ({mount.fstype} from {mount.source})", action="unmount", node=node
    )
    return how


_TAKE = {
    "rename": _take_rename,
    "remove": _take_remove,
    "chmod": _take_chmod,
    "ro": _take_ro,
    "unmount": _take_unmount,
}


def restore(args: argparse.Namespace, out: Reporter) -> None:
    node = _node(args.node_dir)
    record = state.state_file(node, "fault")
    try:
        doc = state.load(record)
    except ValueError as exc:
        raise ScriptError(str(exc)) from None
    if doc is None:
        raise ScriptError(f"no fault recorded for {node} ({record} does not exist)")
    how = doc.get("how")
    if how in ("rename", "remove"):
        away = str(doc["away"])
        if os.path.lexists(node):
            raise ScriptError(f"{node} exists again; move it away before restoring {away}")
        _move(away, node)
        out.action(f"moved {away} back to {node}", action="move-back", node=node, source=away)
        if how == "remove":
            try:
                os.rmdir(os.path.dirname(away))  # the stash, if now empty
            except OSError:
                pass
    elif how == "chmod":
        mode = int(str(doc["mode"]))
        os.chmod(node, mode)
        out.action(f"chmod {mode:04o} {node}", action="chmod", node=node, mode=f"{mode:04o}")
    elif how == "ro":
        _restore_ro(node, doc, out)
    elif how == "unmount":
        _restore_mount(node, doc, out)
    else:
        raise ScriptError(f"{record}: unknown fault {how!r}")
    state.remove(record)
    out.action(f"removed {record}", action="forget", path=record)
    out.result(node=node, how=how)


def _restore_ro(node: str, doc: dict[str, object], out: Reporter) -> None:
    mount = mounts.top(node)
    if mount is None or mount.mount_id != doc.get("mount_id"):
        out.note(f"the read-only mount on {node} is gone already; nothing to unmount")
        return
    res = mounts.lazy_unmount(node)
    if res.returncode != 0:
        raise ScriptError(f"umount -l {node}: {res.stderr.strip()}")
    out.action(f"unmounted the read-only mount on {node}", action="unmount-ro", node=node)


def _restore_mount(node: str, doc: dict[str, object], out: Reporter) -> None:
    if mounts.top(node) is not None:
        raise ScriptError(f"{node} is a mount point again; refusing to mount over it")
    opts = [str(o) for o in doc.get("options") or []]  # type: ignore[attr-defined]
    bind, loop = doc.get("bind_source"), doc.get("loop_file")
    if bind and os.path.isdir(str(bind)):
        _run(["mount", "--bind", str(bind), node])
        if doc.get("read_only"):
            _run(["mount", "-o", "remount,bind,ro", node])
        what = f"bind mount of {bind}"
    else:
        opts = [o for o in opts if o != "seclabel"] + (["ro"] if doc.get("read_only") else [])
        source = str(loop or doc["source"])
        if loop:
            opts.append("loop")
        _run(["mount", "-t", str(doc["fstype"]), "-o", ",".join(opts) or "defaults", source, node])
        what = f"{doc['fstype']} from {source}"
    out.action(f"mounted {node} again ({what})", action="mount", node=node)
    if slivers.read_identity(node) is None:
        out.note(f"{node} is mounted again but shows no walrusfs-node.json")


# -- wipe ---------------------------------------------------------------------------------


def _remove_live_tree(node: str, tree: str) -> None:
    """Delete `tree`, which a mount may be writing into right now, as a disk swap would.

    The tree is first renamed aside (under a temp name that walrusfs never reads), so the
    mount at once sees it gone; writers that had a directory open inside it may still add
    a file or two, so the removal is retried until they have let go.
    """
    aside = os.path.join(node, f".tmp-wiped-{secrets.token_hex(8)}")
    os.rename(tree, aside)
    for _ in range(50):
        shutil.rmtree(aside, ignore_errors=True)
        if not os.path.lexists(aside):
            return
        time.sleep(0.1)
    shutil.rmtree(aside)  # still busy after 5 s: report why


def wipe(args: argparse.Namespace, out: Reporter) -> None:
    node = _node(args.node_dir)
    _require_node(node)
    files = slivers.scan(node)
    tree = os.path.join(node, "slivers")
    if os.path.isdir(tree):
        _remove_live_tree(node, tree)
    size = sum(f.size for f in files)
    out.action(
        f"removed {len(files)} sliver files ({size} bytes) from {node}",
        action="wipe-slivers",
        node=node,
        files=len(files),
        bytes=size,
    )
    if args.everything:
        for name in sorted(os.listdir(node)):
            if name in ("walrusfs-node.json", "lost+found"):
                continue
            path = os.path.join(node, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            out.action(f"removed {path}", action="remove", path=path)
    if args.identity_too:
        path = os.path.join(node, "walrusfs-node.json")
        os.unlink(path)
        out.action(f"removed {path}", action="remove", path=path)
    out.result(node=node, slivers_removed=len(files))


# -- corrupt ------------------------------------------------------------------------------


def _select(
    files: list[slivers.SliverFile], args: argparse.Namespace, rng: random.Random
) -> list[slivers.SliverFile]:
    if args.blob is not None:
        want = args.blob.lower()
        picked = [f for f in files if f.blob_id.hex().startswith(want)]
        if not picked:
            raise ScriptError(f"no sliver file of blob {want} on this node")
        return picked
    if args.fraction is not None:
        k = max(1, round(args.fraction * len(files)))
    else:
        k = args.count if args.count is not None else 1
    if k > len(files):
        raise ScriptError(f"asked for {k} files but the node holds only {len(files)}")
    return sorted(rng.sample(files, k), key=lambda f: f.key)


def _mount_of(path: str) -> tuple[str, str]:
    """(walrusfs mountpoint, path inside it) for a file on a mounted walrusfs."""
    real = os.path.realpath(path)
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            mounts[fields[4].encode().decode("unicode_escape")] = fstype
    probe = real
    while True:
        if mounts.get(probe) == "fuse.walrusfs":
            return probe, os.path.relpath(real, probe)
        if probe == "/":
            raise UsageError(f"--path {path}: not on a mounted walrusfs")
        probe = os.path.dirname(probe)


def _blobs_of(path: str) -> tuple[str, set[str], list[str]]:
    """The mountpoint, the blob ids (hex) holding `path`, and the volume's node paths."""
    try:
        from walrusfs.control import ControlError, query
    except ImportError:
        raise ScriptError("--path needs walrusfs importable: run with .venv/bin/python") from None

    mnt, rel = _mount_of(path)
    try:
        found = query(mnt, "blobs-of", path=rel)
        nodes = [str(n["path"]) for n in query(mnt)["nodes"]]  # type: ignore[attr-defined, index]
    except ControlError as exc:
        raise ScriptError(f"--path {path}: {exc}") from None
    blobs = {str(b) for b in found["blobs"]}  # type: ignore[attr-defined]
    if not blobs:
        raise ScriptError(f"--path {path}: the file has no stored data yet (empty, or not closed)")
    return mnt, blobs, nodes


def corrupt(args: argparse.Namespace, out: Reporter) -> None:
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 32)
    rng = random.Random(seed)
    wanted: set[str] | None = None
    if args.path is not None:
        mnt, wanted, volume_nodes = _blobs_of(args.path)
        if args.node_dir is None:
            args.node_dir = rng.choice(volume_nodes)
        out.action(
            f"{args.path}: {len(wanted)} blobs on {mnt}", action="blobs", blobs=sorted(wanted)
        )
    if args.node_dir is None:
        raise UsageError("corrupt needs NODE_DIR (or --path FILE_IN_MOUNT)")
    node = _node(args.node_dir)
    ident = _require_node(node)
    out.action(f"seed {seed} (pass --seed {seed} to repeat this run)", action="seed", seed=seed)
    files = slivers.scan(node)
    if wanted is not None:
        files = [f for f in files if f.blob_id.hex() in wanted]
        if args.fraction is None and args.count is None:
            args.fraction = 1.0  # by default, every sliver of that file on this node
    if not files:
        raise ScriptError(f"{node}: holds no sliver files to corrupt")
    targets = _select(files, args, rng)
    # A mounted volume deletes sliver files as its files change: one listed by the scan
    # may be gone when its turn comes. A random pick then takes another; a named one fails.
    spare = [f for f in files if f not in targets] if wanted is None and args.blob is None else []
    hit: set[str] = set()
    results = []
    for target in targets:
        if target.key in hit:
            continue  # already damaged as the partner of an earlier swap
        while True:
            try:
                result, other = _corrupt_one(target, files, targets, hit, args, rng, ident)
                break
            except FileNotFoundError as exc:
                gone = (
                    f"{exc.filename or target.path}: deleted since the scan (the volume is in use)"
                )
                files = [f for f in files if f.path != exc.filename]
                spare = [f for f in spare if f.path != exc.filename]
                if not spare:
                    raise ScriptError(gone) from None
                out.note(f"{gone}; taking another file")
                if exc.filename == target.path:
                    target = spare.pop(rng.randrange(len(spare)))
            except corruption.CorruptError as exc:
                if not spare:
                    raise ScriptError(f"{target.key}: {exc}") from None
                out.note(f"{target.key}: {exc}; taking another file")
                target = spare.pop(rng.randrange(len(spare)))
        if other is not None:
            hit.add(other.key)
        hit.add(target.key)
        results.append(result)
        _report_hit(out, args.mode, result)
    out.result(node=node, mode=args.mode, seed=seed, files=[_hit_json(r) for r in results])
    if any(not r.changed for r in results):
        out.note("some files were left unchanged (see above): their damage would prove nothing")


def _corrupt_one(
    target: slivers.SliverFile,
    files: list[slivers.SliverFile],
    targets: list[slivers.SliverFile],
    hit: set[str],
    args: argparse.Namespace,
    rng: random.Random,
    ident: dict[str, object] | None,
) -> tuple[corruption.Hit, slivers.SliverFile | None]:
    """Damage one file as args.mode says: (what was done, the swap partner if any).

    Raises CorruptError, FileNotFoundError (the file or its partner is gone).
    """
    if args.mode == "swap":
        other = corruption.partner_for(target, files, hit | {t.key for t in targets}, rng)
        return corruption.swap(target, other), other
    if args.mode == "foreign":
        return corruption.foreign(target, corruption.partner_for(target, files, hit, rng)), None
    return corruption.damage(target, args.mode, args.region, args.bits, rng, ident), None


def _report_hit(out: Reporter, mode: str, hit: corruption.Hit) -> None:
    fields = _hit_json(hit)
    out.action(f"{mode} {hit.file.key}: {hit.detail}", action=mode, **fields)


def _hit_json(hit: corruption.Hit) -> dict[str, object]:
    doc: dict[str, object] = {
        "path": hit.file.path,
        "blob_id": hit.file.blob_id.hex(),
        "pair": hit.file.pair,
        "detail": hit.detail,
        "changed": hit.changed,
    }
    if hit.partner is not None:
        doc["partner"] = hit.partner.path
    return doc


# -- list ---------------------------------------------------------------------------------


def list_node(args: argparse.Namespace, out: Reporter) -> None:
    node = _node(args.node_dir)
    try:
        files = slivers.scan(node)
    except OSError as exc:
        raise ScriptError(f"{node}: cannot list: {exc.strerror or exc}") from None
    rows = [
        {"blob_id": f.blob_id.hex(), "pair": f.pair, "size": f.size, "key": f.key} for f in files
    ]
    if not out.as_json:
        for f in files:
            print(f"{f.blob_id.hex()}  p{f.pair:<3d} {f.size:>12d}  {f.key}")
        print(f"{len(files)} sliver files, {sum(f.size for f in files)} bytes")
    out.result(node=node, files=rows, total_bytes=sum(f.size for f in files))


# -- arguments ----------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: must be in (0, 1]")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _blob_hex(text: str) -> str:
    if len(text) < 4 or len(text) > 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(f"{text}: want a blob id in hex (at least 4 digits)")
    return text


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 done, 1 failed (the printed lines say how far it got), "
        "2 bad usage or not supported. Run a subcommand with --help for details.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "take-away",
        help="lose a node as a user would (rename, remove, chmod, ro, unmount)",
        description="Make a node directory unavailable; `restore` undoes it. "
        "rename: moved aside to .walrusfs-away-NAME. remove: moved into .walrusfs-stash/ "
        "(or deleted with --for-good). chmod: mode 000 (root ignores it: use ro as root). "
        "ro: read-only bind mount over the node. unmount: lazily unmount a node that is "
        "its own mount point (bind, loop or device mounts; not tmpfs or FUSE).",
    )
    p.add_argument("node_dir", metavar="NODE_DIR")
    p.add_argument("--how", choices=HOWS, required=True)
    p.add_argument("--for-good", action="store_true", help="with --how remove: really delete it")
    add_json(p)

    p = sub.add_parser(
        "restore",
        help="undo take-away",
        description="Undo `take-away` on NODE_DIR, "
        "using the record .walrusfs-fault-NAME.json beside it.",
    )
    p.add_argument("node_dir", metavar="NODE_DIR")
    add_json(p)

    p = sub.add_parser(
        "wipe",
        help="delete a node's slivers, as a replaced disk",
        description="Delete every sliver file of NODE_DIR (the node identity stays, so the "
        "node looks like a replaced disk that was given back its identity).",
    )
    p.add_argument("node_dir", metavar="NODE_DIR")
    p.add_argument(
        "--everything",
        action="store_true",
        help="also delete everything else but the identity (journal, checkpoints, ...)",
    )
    p.add_argument("--identity-too", action="store_true", help="also delete walrusfs-node.json")
    add_json(p)

    p = sub.add_parser(
        "corrupt",
        help="damage sliver files (flip, truncate, zero, swap, foreign)",
        description="Damage sliver files of NODE_DIR, atomically (readers see old or new "
        "bytes), reproducibly (--seed). flip: flip --bits bits per damaged part. truncate: cut "
        "the file short. zero: overwrite a range with zeros. swap: exchange the contents of two "
        "files. foreign: replace a file by another blob's sliver file under the same name. "
        "--region all (default) damages every part a reader may use: both slivers (and the "
        "header one time in four), so any read of the pair finds it.",
    )
    p.add_argument("node_dir", metavar="NODE_DIR", nargs="?")
    p.add_argument("--mode", choices=corruption.MODES, required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--count", type=_positive, help="damage K random sliver files (default 1)")
    which.add_argument("--fraction", type=_fraction, help="damage this fraction of the files")
    which.add_argument(
        "--blob", type=_blob_hex, help="damage the files of this blob (hex id or prefix)"
    )
    p.add_argument(
        "--region",
        choices=corruption.REGIONS,
        default="all",
        help="where flip, truncate and zero land (default: all)",
    )
    p.add_argument("--bits", type=_positive, default=1, help="bits flipped per damaged part (flip)")
    p.add_argument("--seed", type=int, help="random seed (printed when not given)")
    p.add_argument(
        "--path",
        metavar="FILE_IN_MOUNT",
        help="damage the slivers of this file of a mounted walrusfs (on NODE_DIR, else on a "
        "random node of its volume; all of them unless --count/--fraction)",
    )
    add_json(p)

    p = sub.add_parser(
        "list",
        help="list a node's sliver files",
        description="List the sliver files of NODE_DIR: blob id, pair, size, key.",
    )
    p.add_argument("node_dir", metavar="NODE_DIR")
    add_json(p)
    return top


COMMANDS = {
    "take-away": take_away,
    "restore": restore,
    "wipe": wipe,
    "corrupt": corrupt,
    "list": list_node,
}


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, parser(), argv, dispatcher(COMMANDS))


if __name__ == "__main__":
    sys.exit(main())
