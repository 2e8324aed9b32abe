# tracefleet VM guest init: PID 1 of the kernel-matrix guest (see tests/vm/README.md).
#
# The kernel runs it as `/bin/sh init.sh NONCE CONFIG` (init=/bin/sh, arguments after `--`
# on the kernel command line), so it needs no exec bit. The root file system is the host's,
# exported read-only over virtiofs: every write goes to a tmpfs mounted here.
# Results go to the serial console between markers carrying NONCE (tests/vm/run.py parses
# them): the junit XML in base64 with its sha256, then pytest's exit status. Then power off.
# POSIX sh only: it runs under dash (/bin/sh) and busybox for a few applets.

NONCE=${1:-nononce}
CONFIG=${2:-}
BB=/bin/busybox
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

marker() { echo "@@TFVM $NONCE $*@@"; }

poweroff_now() {
  sync 2>/dev/null
  "$BB" poweroff -f 2>/dev/null
  echo o >/proc/sysrq-trigger 2>/dev/null
  # Still here: returning from PID 1 panics the kernel; with panic=-1 and qemu -no-reboot
  # that ends the VM too.
  exit 1
}

# An error that prevents running the tests: report it, no STATUS marker (the host fails).
die() {
  marker "ERROR $*"
  poweroff_now
}

uptime_s() { cut -d' ' -f1 /proc/uptime 2>/dev/null || echo 0; }

# --- kernel file systems -------------------------------------------------------------------
mount -t proc proc /proc || die "cannot mount /proc"
mount -t sysfs sysfs /sys || die "cannot mount /sys"
# A kernel with CONFIG_DEVTMPFS_MOUNT (the 6.12 build) has mounted it already.
grep -q '^[^ ]* /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev \
  || die "cannot mount /dev"
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts || die "cannot mount /dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm || die "cannot mount /dev/shm"
mount -t mqueue mqueue /dev/mqueue 2>/dev/null || true
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx

marker "STAGE init uptime=$(uptime_s)"

[ -n "$CONFIG" ] && [ -r "$CONFIG" ] || die "guest config '$CONFIG' not readable"
# shellcheck disable=SC1090  # written by run.py: TFVM_* variables and tfvm_pytest()
. "$CONFIG" || die "cannot source $CONFIG"

# --- writable scratch: tmpfs only -----------------------------------------------------------
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run || die "cannot mount /run"
mkdir -p /run/lock /run/netns /run/tfvm
if [ "$TFVM_TMP_TMPFS" = 1 ]; then
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp || die "cannot mount /tmp"
  TMPDIR=/tmp
else
  # The repo, the Python or a test path lives under the host's /tmp: keep it visible.
  mkdir -p /run/tfvm/tmp && chmod 1777 /run/tfvm/tmp
  TMPDIR=/run/tfvm/tmp
fi
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp 2>/dev/null || true
HOME=/run/tfvm/home
mkdir -p "$HOME" "$TMPDIR/tfvm"

# The guest must not be able to write to the host: the export is read-only. Check it.
probe="$TFVM_REPO/.tfvm-write-probe-$NONCE"
if (: >"$probe") 2>/dev/null; then
  rm -f "$probe"
  die "the host file system is writable from the guest (export must be read-only)"
fi

# --- tracing file systems, cgroups, network ----------------------------------------------
warn=""
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || warn="$warn tracefs"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || warn="$warn debugfs"
mount -t bpf bpf /sys/fs/bpf 2>/dev/null || warn="$warn bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || warn="$warn cgroup2"
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null || true
[ -z "$warn" ] || marker "WARN could not mount:$warn"
ip link set lo up 2>/dev/null || "$BB" ip link set lo up 2>/dev/null || marker "WARN lo not up"
"$BB" hostname tfvm 2>/dev/null || true

# --- environment for the tests -------------------------------------------------------------
TRACEFLEET_IN_VM=1
TRACEFLEET_KERNEL=$(uname -r)
PATH="$TFVM_REPO/.venv/bin:$PATH"
export HOME TMPDIR PATH TRACEFLEET_IN_VM TRACEFLEET_KERNEL
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PY_COLORS=0 LANG=C.UTF-8 TERM=dumb
export COLUMNS=160   # the console is a tty of 80 columns: pytest -v would cut skip reasons
export XDG_CACHE_HOME="$HOME/.cache" XDG_CONFIG_HOME="$HOME/.config" XDG_RUNTIME_DIR=/run/tfvm
export HYPOTHESIS_STORAGE_DIRECTORY="$HOME/.hypothesis"   # not ./.hypothesis: read-only
tfvm_env 2>/dev/null || true   # extra variables from run.py (--env, TRACEFLEET_* of the host)

marker "INFO kernel=$TRACEFLEET_KERNEL"
marker "INFO lsm=$(cat /sys/kernel/security/lsm 2>/dev/null || echo unknown)"
marker "INFO cpus=$(grep -c ^processor /proc/cpuinfo) mem_kb=$(awk '/MemTotal/{print $2}' /proc/meminfo)"

cd "$TFVM_REPO" || die "cannot cd to $TFVM_REPO"
[ -x "$TFVM_PYTHON" ] || die "python '$TFVM_PYTHON' missing in the guest"

# --- the tests -----------------------------------------------------------------------------
JUNIT="$TMPDIR/tfvm/junit.xml"
marker "STAGE pytest-start uptime=$(uptime_s)"
tfvm_pytest "$JUNIT" </dev/null
status=$?
marker "STAGE pytest-end uptime=$(uptime_s)"

# Stop whatever the tests left running so it cannot write into the results, and keep
# kernel messages off the console while they are printed.
kill -TERM -1 2>/dev/null
sleep 1
kill -KILL -1 2>/dev/null
echo 1 >/proc/sys/kernel/printk 2>/dev/null

if [ -s "$JUNIT" ]; then
  size=$(wc -c <"$JUNIT")
  sum=$(sha256sum "$JUNIT" 2>/dev/null || "$BB" sha256sum "$JUNIT")
  marker "BEGIN junit bytes=$size sha256=${sum%% *}"
  base64 "$JUNIT" 2>/dev/null || "$BB" base64 "$JUNIT"
  marker "END junit"
else
  marker "NOJUNIT"
fi
marker "STATUS $status"
poweroff_now
