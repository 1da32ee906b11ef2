#!/usr/bin/env bash
# Set up a fresh Debian machine for walrusfs: system packages (FUSE 3) and ./.venv with
# the project installed editable. Idempotent and quick when nothing changed, so `make`
# targets can call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${WALRUSFS_EXTRAS:-dev,bench}"
# rsync and git: the filesystem is tested with the tools people use on it. openssh-server
# and sshfs: scripts/sshfs_node.py puts a node on a real remote mount; e2fsprogs: a loop
# ext4 node for `faults.py take-away --how unmount`.
apt_packages=(fuse3 libfuse3-dev pkg-config python3-venv rsync git openssh-server sshfs e2fsprogs)

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi

# Reinstall only when the project's declared dependencies change.
stamp=.venv/.walrusfs-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing walrusfs[$extras] into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
  echo "$want" > "$stamp"
fi

# mount(8) looks for /sbin/mount.TYPE: this makes `mount -t walrusfs` and fstab lines work.
if [ "$(id -u)" -eq 0 ] && [ -d /sbin ]; then
  target="$(pwd)/.venv/bin/mount.walrusfs"
  current="$(readlink /sbin/mount.walrusfs 2>/dev/null || true)"
  if [ -x "$target" ] && { [ -z "$current" ] || [[ "$current" == */.venv/bin/mount.walrusfs ]]; }; then
    ln -sf "$target" /sbin/mount.walrusfs
  fi
fi
