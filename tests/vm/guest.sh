#!/bin/sh
# Runs inside the cgroup v2 VM, started by the image's init (tests/vm/image.sh)
# from the shared work tree. Prepares the node as systemd would (the root
# cgroup passes its controllers on), runs each suite the host listed in
# /results/plan.sh, checks that nothing outlived them (cgroups, mounts,
# processes, files in /tmp), and leaves every result in /results for the host.
set -u
R=/results
export HOME=/root RUST_BACKTRACE=1 BERTH_IN_VM=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# berth.timescale=<n> on the kernel command line (tests/vm/run.sh): the
# harness's waits are stretched n times under software emulation.
for a in $(cat /proc/cmdline); do
  case $a in berth.timescale=*) export BERTH_TEST_TIME_SCALE=${a#berth.timescale=} ;; esac
done

echo "berth-vm guest: kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo), test waits x${BERTH_TEST_TIME_SCALE:-1}"
echo "berth-vm guest: cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
grep -q cgroup2 /proc/mounts && ! grep -q ' cgroup ' /proc/mounts || echo "berth-vm guest: WARNING: not cgroup v2 only"
# /tmp on the root disk, as on a node (tests put state dirs there, and
# `check` rightly warns about a state dir on tmpfs).
umount /tmp 2>/dev/null && chmod 1777 /tmp
# Plain init brings no interface up; the agents bind their HTTP port on loopback.
ip link set lo up
for c in cpu memory pids io; do echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control; done
echo "berth-vm guest: root passes on: $(cat /sys/fs/cgroup/cgroup.subtree_control)"

# What "nothing leaked" is compared against.
snapshot() {
  echo "# cgroups"; find /sys/fs/cgroup -mindepth 1 -type d | sort
  echo "# mounts"; awk '{print $5}' /proc/self/mountinfo | sort
  echo "# tmp"; ls -A /tmp | sort
  echo "# processes"; ps -eo comm= | grep -E '^(berth-|fakekitd|fakeclient|sleep)' | sort
}
snapshot >/run/berth-vm-before 2>&1

suite() {
  name=$1 dir=$2
  shift 2
  echo "berth-vm guest: == $name: $*"
  t0=$(date +%s)
  (cd "$dir" && "$@") >"$R/$name.log" 2>&1
  rc=$?
  echo "$rc" >"$R/$name.rc"
  echo "berth-vm guest: == $name: exit $rc in $(($(date +%s) - t0)) s"
  grep -E '^test result|FAILED|panicked' "$R/$name.log" | head -n 20
}

if [ -f "$R/plan.sh" ]; then
  . "$R/plan.sh"
fi

sleep 1
# Shared instance parents stay by design for the next agent (/berth of the
# root-cgroup agent, --cgroup-parent dirs of the tests); rmdir removes them
# only when empty, so a leaked instance cgroup or process below still shows.
for d in /sys/fs/cgroup/berth /sys/fs/cgroup/berth-shimtest /sys/fs/cgroup/berth-test; do
  rmdir "$d" 2>/dev/null
done
snapshot >/run/berth-vm-after 2>&1
if diff -u /run/berth-vm-before /run/berth-vm-after >"$R/leaks.log"; then
  echo 0 >"$R/leaks.rc"
  echo "berth-vm guest: nothing leaked (cgroups, mounts, /tmp, processes)"
else
  echo 1 >"$R/leaks.rc"
  echo "berth-vm guest: LEAKED:"
  cat "$R/leaks.log"
fi
echo done >"$R/done"
