#!/usr/bin/env bash
# Builds (or finds in the cache) the cgroup v2 test VM: a Debian root file
# system from debootstrap with Debian's own kernel, as an ext4 image plus the
# kernel and initrd to boot it with `qemu -kernel/-initrd`.
#
# The image is cached under $BERTH_VM_CACHE (default /var/cache/berth-vm), in a
# dir named after a hash of this recipe, so it is built once per machine and
# rebuilt when the recipe changes. Prints the dir on stdout.
#
# The Debian mirror comes from this machine's own apt sources; no host name is
# written here. Needs root, debootstrap and e2fsprogs (mkfs.ext4 -d).
set -euo pipefail

SUITE=${BERTH_VM_SUITE:-bookworm}
# Packages: the kernel (cgroup v2, overlayfs, 9p, veth, nf_tables as modules),
# and the tools the privileged suites call (nftables, iproute2, e2fsprogs for
# the network and disk-limit suites, util-linux for mount/unshare/nsenter).
PACKAGES=linux-image-amd64,kmod,procps,iproute2,nftables,e2fsprogs,util-linux,mount,psmisc
SIZE=${BERTH_VM_IMAGE_SIZE:-3G}

cache=${BERTH_VM_CACHE:-/var/cache/berth-vm}
here=$(cd "$(dirname "$0")" && pwd)
key=$( (cat "$here/image.sh"; echo "$SUITE $PACKAGES $SIZE") | sha256sum | cut -c1-16)
out="$cache/$SUITE-$key"

log() { echo "berth-vm image: $*" >&2; }

if [[ -f "$out/ready" ]]; then
  echo "$out"
  exit 0
fi

# The first `deb` URI of this machine's apt sources (deb822 .sources files or
# the one-line sources.list format) that is not a security or updates suite.
mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk '
      /^[[:space:]]*$/ { if (deb && uri && !sec) { print uri; exit } deb=0; uri=""; sec=0; next }
      /^Types:/ { for (i=2;i<=NF;i++) if ($i=="deb") deb=1 }
      /^URIs:/ { uri=$2 }
      /^Suites:/ { if ($0 ~ /security/) sec=1 }
      END { if (deb && uri && !sec) print uri }
    ' "$f" | head -n1
  done
  if [[ -f /etc/apt/sources.list ]]; then
    awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i !~ /^\[/) { print $i; exit } }' /etc/apt/sources.list
  fi
}

MIRROR=${BERTH_VM_MIRROR:-$(mirror | head -n1)}
if [[ -z $MIRROR ]]; then
  log "no Debian mirror found in /etc/apt/sources.list{,.d/*.sources}; set BERTH_VM_MIRROR"
  exit 1
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [[ -f "$out/ready" ]]; then
  echo "$out"
  exit 0
fi

rm -rf "$cache"/.build-*  # what an interrupted build left (we hold the lock)
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'umount -R "$work/root" 2>/dev/null || true; rm -rf "$work"' EXIT
log "debootstrap $SUITE from the machine's apt mirror into $work/root (a few minutes)"
start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}

r=$work/root
# The guest's init: a plain script, no systemd. It mounts what a node has
# (proc, sys, cgroup2 only, devtmpfs), then runs the lane's guest script from
# the shared work tree (so changing the tests never rebuilds the image).
cat >"$r/sbin/berth-init" <<'INIT'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The initramfs hands over /proc, /sys and /dev already mounted.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs shm /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t tmpfs -o mode=755 run /run
echo "berth-vm: init up, kernel $(uname -r)"
for m in 9p 9pnet_virtio overlay veth nf_tables loop ext4; do modprobe -q $m; done
# berth.work=<dir> berth.target=<dir> on the kernel command line: where the
# host's work tree and target dir are, mounted at the same paths here so the
# test binaries find their siblings and their compiled-in paths.
for a in $(cat /proc/cmdline); do
  case $a in
    berth.work=*) export BERTH_VM_WORK=${a#berth.work=} ;;
    berth.target=*) export BERTH_VM_TARGET=${a#berth.target=} ;;
  esac
done
mkdir -p "$BERTH_VM_WORK" /results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro work "$BERTH_VM_WORK"
mkdir -p "$BERTH_VM_TARGET" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 target "$BERTH_VM_TARGET"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results
sh "$BERTH_VM_WORK/tests/vm/guest.sh"
echo "berth-vm: guest script exited $?"
sync
# No systemd, no poweroff(8): the kernel powers off (qemu then exits).
echo o >/proc/sysrq-trigger
sleep 60
INIT
chmod 755 "$r/sbin/berth-init"
echo berth-vm >"$r/etc/hostname"

# A small initrd: only what mounts the root disk (MODULES=most takes a
# minute of emulated udev probing at every boot). The default one stays if
# this fails.
printf 'virtio_pci\nvirtio_blk\next4\n' >>"$r/etc/initramfs-tools/modules"
sed -i 's/^MODULES=.*/MODULES=list/' "$r/etc/initramfs-tools/initramfs.conf"
chroot "$r" update-initramfs -u -k all >"$work/initramfs.log" 2>&1 || log "small initrd failed (kept the default): $(tail -n 3 "$work/initramfs.log")"

mkdir -p "$work/out"
cp "$r"/boot/vmlinuz-* "$work/out/vmlinuz"
cp "$r"/boot/initrd.img-* "$work/out/initrd.img"
umount -R "$r/proc" "$r/sys" 2>/dev/null || true
log "mkfs.ext4 -d (no loop device needed)"
mkfs.ext4 -q -F -L berth-vm -d "$r" "$work/out/rootfs.ext4" "$SIZE"
echo "$SUITE $MIRROR $(date -u +%FT%TZ) $(( $(date +%s) - start ))s" >"$work/out/ready"
rm -rf "$out"
mv "$work/out" "$out"
log "built $out in $(( $(date +%s) - start )) s"
echo "$out"
