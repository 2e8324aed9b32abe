#!/usr/bin/env bash
# Install everything tracefleet needs on a fresh Debian bookworm host (root), idempotently:
# Debian packages, the Python venv (.venv) with the three distributions in editable mode,
# buf (from the npm registry), and the tracefs/bpffs/debugfs mounts.
# Re-running it is cheap: each step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
log() { printf '[install-deps] %s\n' "$*" >&2; }

APT_PACKAGES=(
  clang llvm libbpf-dev libbpf1 bpftool     # BPF build: clang 14, libbpf 1.1 headers and .so, bpftool 7.1
  gcc make libc6-dev                        # C workloads
  bpftrace strace linux-perf                # peers compared against in tests and benchmarks
  qemu-system-x86 busybox-static            # Linux 7.2 guest for the kernel matrix (make test-vm)
  prometheus                                # real Prometheus for the dashboard tests (promtool)
  etcd-server                               # controller replicas on etcd (a 3-member test cluster)
  iproute2 iptables                         # network namespaces for partition tests
  e2fsprogs mount util-linux                # vfs tests: mkfs.ext4, loop mounts, taskset
  kmod                                      # modprobe: zram, ext4, loop, overlay where they are modules
  containerd runc                           # a real container runtime for the workload attribution test
  nodejs                                    # buf comes from the npm registry (npm below)
  python3-venv python3-dev                  # python3-dev: headers of the compiled decode (make native)
)
# nodesource's nodejs bundles npm and conflicts with Debian's npm package
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]}; run this script as root (or apt-get install them)"
    exit 1
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python: one venv for development holding all three distributions (the images install them
# separately; the controller's image has no libbpf).
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.tracefleet-deps
want=$(cat proto/pyproject.toml agent/pyproject.toml controller/pyproject.toml tests/requirements.txt | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  log "installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -r tests/requirements.txt
  .venv/bin/pip install -q -e proto -e agent -e controller
  echo "$want" >"$stamp"
fi

# buf, for linting the API and its breaking-change check (the npm package ships the binary).
if [[ ! -x build/tools/node_modules/.bin/buf ]]; then
  log "installing buf into build/tools"
  mkdir -p build/tools
  npm install --silent --no-audit --no-fund --prefix build/tools @bufbuild/buf@1 >/dev/null
fi

# Kernel file systems the agent reads. Containers and fresh VMs often lack them.
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null \
  || log "warning: could not mount tracefs at /sys/kernel/tracing (BPF tests will skip)"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null \
  || log "warning: could not mount bpffs at /sys/fs/bpf"
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
log "ready: $ROOT/.venv ($(.venv/bin/python --version))"
