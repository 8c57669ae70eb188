#!/usr/bin/env bash
# Boot speed side by side with QEMU: wall and CPU time from start to the
# initramfs marker (its /init powers off right after it), median of N runs,
# for Debian's cloud and generic kernels:
#   - Tandem's interpreter (--deterministic) against qemu-system-x86_64 -accel tcg;
#   - Tandem on KVM against QEMU on KVM, with --kvm (on a PVM host QEMU does
#     not boot these kernels at all and Tandem takes over 20 minutes).
#
#   scripts/bench-linux.sh [--runs N] [--timeout SECS] [--kvm] [--kernels "cloud generic"]
#
# Installs qemu-system-x86 from Debian when missing (as root), builds the
# guest with scripts/linux-guest.sh and Tandem in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=5
limit=600
kvm=0
kernels="cloud generic"
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) runs=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    --kvm) kvm=1; shift ;;
    --kernels) kernels=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--timeout SECS] [--kvm] [--kernels LIST]" >&2; exit 2 ;;
    esac
done

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86
    else
        echo "bench-linux.sh: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2
        exit 1
    fi
fi
scripts/linux-guest.sh target/linux-guest >/dev/null
cargo build --release --bin tandem -q
G=target/linux-guest
T=target/release/tandem
OUTD=target/bench-linux
mkdir -p "$OUTD"

# One run: prints "wall cpu ok" (seconds; ok=1 when the marker appeared).
one() { # name command...
    local name=$1
    shift
    local log="$OUTD/$name.log" tf="$OUTD/$name.time"
    /usr/bin/time -f "%e %U %S" -o "$tf" timeout "$limit" "$@" >"$log" 2>&1 </dev/null || true
    local ok=0
    grep -q "TANDEM-INIT-MARKER" "$log" && ok=1
    awk -v ok=$ok 'END { printf "%.2f %.2f %d\n", $1, $2 + $3, ok }' "$tf"
}

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

bench() { # label kernel-file command-kind
    local label=$1 kernel=$2 kind=$3 walls="" cpus="" fails=0
    for i in $(seq 1 "$runs"); do
        case "$kind" in
        tandem-interp) r=$(one "$label-$i" $T run --backend interp --deterministic --mem 512M \
            --kernel "$G/$kernel" --initrd "$G/initramfs.cpio.gz" --append "console=ttyS0") ;;
        tandem-kvm) r=$(one "$label-$i" $T run --backend kvm --mem 512M \
            --kernel "$G/$kernel" --initrd "$G/initramfs.cpio.gz" --append "console=ttyS0") ;;
        qemu-tcg) r=$(one "$label-$i" qemu-system-x86_64 -accel tcg -m 512 -nographic -monitor none \
            -no-reboot -kernel "$G/$kernel" -initrd "$G/initramfs.cpio.gz" -append "console=ttyS0") ;;
        qemu-kvm) r=$(one "$label-$i" qemu-system-x86_64 -accel kvm -m 512 -nographic -monitor none \
            -no-reboot -kernel "$G/$kernel" -initrd "$G/initramfs.cpio.gz" -append "console=ttyS0") ;;
        esac
        set -- $r
        if [ "$3" = 1 ]; then
            walls="$walls$1"$'\n'
            cpus="$cpus$2"$'\n'
        else
            fails=$((fails + 1))
        fi
    done
    printf "| %-8s | %-14s | %8s | %8s | %d/%d |\n" "$kernel" "$kind" \
        "$(printf %s "$walls" | grep . | median)" "$(printf %s "$cpus" | grep . | median)" \
        $((runs - fails)) "$runs"
}

echo "| kernel   | runner         | wall (s) | CPU (s)  | reached init |"
echo "|----------|----------------|----------|----------|--------------|"
for k in $kernels; do
    bench "interp-$k" "vmlinuz-$k" tandem-interp
    bench "tcg-$k" "vmlinuz-$k" qemu-tcg
    if [ "$kvm" = 1 ]; then
        bench "kvm-$k" "vmlinuz-$k" tandem-kvm
        bench "qkvm-$k" "vmlinuz-$k" qemu-kvm
    fi
done
echo "(median of $runs runs each; a run that did not reach the marker within ${limit}s counts only in the last column; logs in $OUTD)"
