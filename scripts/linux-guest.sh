#!/bin/sh
# Builds the Linux guest Tandem's tests and benchmarks boot: Debian's stock
# 6.1 kernels (linux-image-cloud-amd64 and linux-image-amd64) and a small
# initramfs around Debian's busybox-static whose /init prints a marker line,
# /proc/interrupts and the clocksource / clockevent in use, then powers off.
#
#   scripts/linux-guest.sh [OUTDIR]        (default: target/linux-guest)
#
# Produces OUTDIR/vmlinuz-cloud, OUTDIR/vmlinuz-generic, OUTDIR/vmlinux-cloud
# and OUTDIR/vmlinux-generic (the uncompressed ELFs, booted through their PVH
# entry) and OUTDIR/initramfs.cpio.gz. Packages come from the machine's apt sources with
# `apt-get download` (no root needed); nothing is installed. Runs again only
# what is missing.
set -eu

OUT=${1:-target/linux-guest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK="$OUT/work"
mkdir -p "$WORK"

# The versioned package a Debian meta package depends on.
real_package() {
    apt-cache depends "$1" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n 1
}

fetch_kernel() { # meta-package, output name
    [ -s "$OUT/$2" ] && return 0
    pkg=$(real_package "$1")
    if [ -z "$pkg" ]; then
        echo "linux-guest.sh: cannot resolve $1 (run apt-get update?)" >&2
        exit 1
    fi
    (cd "$WORK" && apt-get download "$pkg" 2>&1 | grep -v "unsandboxed" || true)
    rm -rf "$WORK/$2.x"
    dpkg-deb -x "$WORK/${pkg}"_*.deb "$WORK/$2.x"
    cp "$WORK/$2.x"/boot/vmlinuz-* "$OUT/$2"
    echo "linux-guest.sh: $OUT/$2 from $pkg"
}

fetch_kernel linux-image-cloud-amd64 vmlinuz-cloud
fetch_kernel linux-image-amd64 vmlinuz-generic

# The uncompressed kernel inside a bzImage (Debian's are LZ4-compressed):
# an ELF vmlinux with a PVH entry note, which boots without running the
# decompressor (minutes of emulated ring-0 code on a software KVM).
extract_vmlinux() { # bzImage, output name
    [ -s "$OUT/$2" ] && return 0
    python3 - "$OUT/$1" "$WORK/$2.payload" <<'PY'
import struct, sys
d = open(sys.argv[1], "rb").read()
setup = (d[0x1F1] or 4) + 1
off, length = struct.unpack_from("<II", d, 0x248)
start = setup * 512 + off
open(sys.argv[2], "wb").write(d[start:start + length])
PY
    magic=$(od -An -tx1 -N4 "$WORK/$2.payload" | tr -d ' ')
    case "$magic" in
    02214c18) lz4 -dc "$WORK/$2.payload" >"$OUT/$2" 2>/dev/null || true ;;
    fd377a58) xz -dc "$WORK/$2.payload" >"$OUT/$2" 2>/dev/null || true ;;
    28b52ffd) zstd -dc "$WORK/$2.payload" >"$OUT/$2" 2>/dev/null || true ;;
    *) echo "linux-guest.sh: $1: unknown payload compression ($magic); no $2" >&2; return 0 ;;
    esac
    if [ "$(od -An -c -N4 "$OUT/$2" | tr -d ' ')" != "177ELF" ]; then
        # Optional: the tests boot the bzImage; the vmlinux is for PVH runs.
        echo "linux-guest.sh: cannot decompress $1 (needs lz4, xz or zstd); no $2" >&2
        rm -f "$OUT/$2"
        return 0
    fi
    echo "linux-guest.sh: $OUT/$2 (the ELF inside $1)"
}
extract_vmlinux vmlinuz-cloud vmlinux-cloud
extract_vmlinux vmlinuz-generic vmlinux-generic

if [ ! -s "$OUT/initramfs.cpio.gz" ]; then
    (cd "$WORK" && apt-get download busybox-static 2>&1 | grep -v "unsandboxed" || true)
    rm -rf "$WORK/bb.x" "$WORK/root"
    dpkg-deb -x "$WORK"/busybox-static_*.deb "$WORK/bb.x"
    mkdir -p "$WORK/root/bin" "$WORK/root/proc" "$WORK/root/sys" "$WORK/root/dev"
    cp "$WORK/bb.x/bin/busybox" "$WORK/root/bin/busybox"
    cat >"$WORK/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "TANDEM-INIT-MARKER: init is running"
cat /proc/interrupts
echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "clockevent: $(cat /sys/devices/system/clockevents/clockevent0/current_device)"
echo "cpus online: $(cat /sys/devices/system/cpu/online)"
echo "TANDEM-INIT-DONE"
poweroff -f
INIT
    chmod 755 "$WORK/root/init"
    # A newc cpio archive (no cpio package needed), with /dev/console so the
    # kernel can open the console before devtmpfs exists.
    python3 - "$WORK/root" "$OUT/initramfs.cpio" <<'PY'
import os, sys
root, out = sys.argv[1], sys.argv[2]
ino = [1]
def hdr(name, mode, size, nlink=1, rdevmajor=0, rdevminor=0):
    ino[0] += 1
    fields = [ino[0], mode, 0, 0, nlink, 0, size, 0, 0, rdevmajor, rdevminor, len(name) + 1, 0]
    h = b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
    return h + b"\0" * ((4 - len(h) % 4) % 4)
def pad(data):
    return data + b"\0" * ((4 - len(data) % 4) % 4)
with open(out, "wb") as f:
    for d, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(d, root)
        if rel != ".":
            f.write(hdr(rel, 0o040755, 0, 2))
        for n in sorted(files):
            p = os.path.join(d, n)
            data = open(p, "rb").read()
            name = os.path.normpath(os.path.join(rel, n))
            f.write(hdr(name, 0o100000 | (os.stat(p).st_mode & 0o777), len(data)))
            f.write(pad(data))
    f.write(hdr("dev/console", 0o020600, 0, 1, 5, 1))
    f.write(hdr("TRAILER!!!", 0, 0, 1))
PY
    gzip -9 -n -f "$OUT/initramfs.cpio"
    echo "linux-guest.sh: $OUT/initramfs.cpio.gz"
fi
