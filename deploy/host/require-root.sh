#!/usr/bin/env bash
# Stop a make target that needs root before it does anything, saying why and how to run
# it. sudo is often absent where you are root already (a fresh Debian machine), so it is
# offered only where it is installed.
# Usage: deploy/host/require-root.sh GOAL...   (exit 0 as root, else 1 with the message)
set -euo pipefail
[[ $(id -u) -eq 0 ]] && exit 0
cmd="make $*"
who="$(id -un 2>/dev/null || echo '?'), uid $(id -u)"
echo "$cmd: needs root: it installs Debian packages, mounts tracefs and bpffs, and loads" \
  "BPF programs into the kernel; you are $who." >&2
if command -v sudo >/dev/null 2>&1; then
  echo "fix: sudo $cmd   (or run it from a root shell)" >&2
else
  echo "fix: run it from a root shell, e.g. su -c '$cmd' (sudo is not installed here)" >&2
fi
exit 1
