#!/usr/bin/env bash
# The cgroup v2 lane: boots a Debian VM with cgroup v2 only (image from
# tests/vm/image.sh, cached), shares this work tree and its target dir with it
# read-only at the same paths, runs the privileged suites there against the
# freshly built binaries, and fails unless every suite passed and nothing
# leaked. Run by hand (as root, after `cargo build --workspace --bins`):
#
#   tests/vm/run.sh                 # builds the test binaries, runs the plan
#   BERTH_VM_PLAN=plan.sh tests/vm/run.sh   # a plan of `suite` lines of your own
#   BERTH_VM_KEEP=1 ...             # keep the suites' logs after a pass too
#
# Hardware KVM is used where it boots the stock kernel (probed once per host
# kernel and cached); elsewhere QEMU's software emulation (TCG).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$work/target}
target=$(cd "$target" && pwd)
cache=${BERTH_VM_CACHE:-/var/cache/berth-vm}
mem=${BERTH_VM_MEMORY:-3072}
cpus=${BERTH_VM_CPUS:-2}
timeout=${BERTH_VM_TIMEOUT:-3600}
scale=1
log() { echo "berth-vm: $*" >&2; }

for tool in qemu-system-x86_64 debootstrap mkfs.ext4; do
  command -v "$tool" >/dev/null || { log "$tool not found: apt-get install qemu-system-x86 debootstrap e2fsprogs"; exit 2; }
done

t0=$(date +%s)
image=${BERTH_VM_IMAGE:-$("$here/image.sh")}
log "image $image ready after $(($(date +%s) - t0)) s"

results=$(mktemp -d /tmp/berth-vm-results-XXXXXX)
chmod 755 "$results"

# The plan: `suite <name> <dir to run in> <test binary> <args>...` lines.
if [[ -n ${BERTH_VM_PLAN:-} ]]; then
  cp "$BERTH_VM_PLAN" "$results/plan.sh"
else
  log "building the test binaries (cargo test --no-run)"
  (cd "$work" && "${CARGO:-cargo}" test --workspace --no-run --message-format=json 2>/dev/null) |
    python3 "$here/plan.py" "$work" >"$results/plan.sh"
fi

# The VM sees a copy of the binaries it runs, at their own paths: a build on
# the host while the lane runs (cargo rewrites target/) must not change them
# under the guest's feet.
stage=$results/target
mkdir -p "$stage"
copy() { mkdir -p "$stage/$(dirname "${1#"$target"/}")" && cp "$1" "$stage/${1#"$target"/}"; }
while read -r _ _ _ exe _; do
  copy "$exe"
done < <(grep '^suite ' "$results/plan.sh")
bindir=$(dirname "$(dirname "$(awk '/^suite /{print $4; exit}' "$results/plan.sh")")")
for exe in "$bindir"/{berth-agent,berth-shim,fakekitd,fakeclient}; do
  [[ -f $exe ]] && copy "$exe"
done

# One qemu run: $1 = accelerator; output on the console log.
boot() {
  local accel=$1 limit=$2 console=$3
  local cpu=(-cpu max)
  [[ $accel == kvm ]] && cpu=(-cpu host)
  timeout --foreground -k 10 "$limit" nice -n 5 qemu-system-x86_64 \
    -machine q35 -accel "$accel" "${cpu[@]}" -smp "$cpus" -m "$mem" \
    -display none -monitor none -serial "file:$console" -no-reboot -nic none \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 init=/sbin/berth-init panic=-1 cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 berth.work=$work berth.target=$target berth.timescale=$scale" \
    -drive "file=$image/rootfs.ext4,format=raw,if=virtio,snapshot=on" \
    -virtfs "local,path=$work,mount_tag=work,security_model=none,readonly=on" \
    -virtfs "local,path=$stage,mount_tag=target,security_model=none,readonly=on" \
    -virtfs "local,path=$results,mount_tag=results,security_model=none"
}

# KVM here may be a paravirtual flavour that boots only its own guest
# kernels and hangs on a stock one: a bounded boot with an empty plan tells.
accel=tcg,thread=multi
if [[ -w /dev/kvm && ${BERTH_VM_ACCEL:-} != tcg ]]; then
  probe="$cache/kvm-$(uname -r)-$(basename "$image")"
  if [[ ! -f $probe ]]; then
    log "probing hardware KVM with a bounded boot"
    pr=$(mktemp -d /tmp/berth-vm-kvmprobe-XXXXXX)
    saved=$results
    results=$pr
    boot kvm 60 "$pr/console.log" >/dev/null 2>&1 || true
    results=$saved
    if [[ -f $pr/done ]]; then echo kvm >"$probe"; else echo tcg >"$probe"; fi
    rm -rf "$pr"
  fi
  [[ $(cat "$probe") == kvm ]] && accel=kvm
fi
[[ -n ${BERTH_VM_ACCEL:-} ]] && accel=$BERTH_VM_ACCEL
# Under software emulation everything runs several times slower (an agent
# takes ~10 s to start): the harness stretches its waits by this factor.
[[ $accel == tcg* ]] && scale=${BERTH_VM_TIME_SCALE:-6}
log "booting ($accel, $cpus cpus, $mem MiB, test waits x$scale); results in $results"

t1=$(date +%s)
rc=0
boot "$accel" "$timeout" "$results/console.log" || rc=$?
log "VM ran $(($(date +%s) - t1)) s (qemu exit $rc)"
cat "$results/console.log" | grep -a 'berth-vm' | sed 's/^/  /' >&2 || true

fail=0
if [[ ! -f $results/done ]]; then
  log "the guest did not finish (timeout ${timeout}s or crash); console tail:"
  tail -n 40 "$results/console.log" >&2
  fail=1
fi
while read -r _ name _; do
  [[ -z $name ]] && continue
  if [[ $(cat "$results/$name.rc" 2>/dev/null) != 0 ]]; then
    log "suite $name FAILED (rc $(cat "$results/$name.rc" 2>/dev/null || echo none)); its log tail:"
    tail -n 60 "$results/$name.log" >&2 || true
    fail=1
  fi
done < <(grep '^suite ' "$results/plan.sh")
if [[ $(cat "$results/leaks.rc" 2>/dev/null) != 0 ]]; then
  log "leak check FAILED:"
  cat "$results/leaks.log" >&2 || true
  fail=1
fi
log "lane took $(($(date +%s) - t0)) s in all"
if [[ $fail == 0 && -n ${BERTH_VM_KEEP:-} ]]; then
  rm -rf "$stage"
  log "cgroup v2 lane passed; every suite's log is kept in $results (BERTH_VM_KEEP)"
elif [[ $fail == 0 ]]; then
  log "cgroup v2 lane passed"
  rm -rf "$results"
else
  rm -rf "$stage"
  log "cgroup v2 lane FAILED; the console and every suite's log are in $results"
fi
exit $fail
