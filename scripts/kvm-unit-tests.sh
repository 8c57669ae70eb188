#!/usr/bin/env bash
# Runs kvm-unit-tests' x86 tests on Tandem's interpreter and on KVM (and on
# QEMU when qemu-system-x86_64 is installed) and prints a table: one row per
# test, per processor the result, the PASS / FAIL / SKIP counts and the time.
#
#   scripts/kvm-unit-tests.sh [options] KUT_BUILD_DIR [TEST...]
#
# KUT_BUILD_DIR is a kvm-unit-tests tree configured and built for x86_64
# (./configure --arch=x86_64 && make). Every test of its x86/unittests.cfg
# runs (or the TESTs named) through the suite's own x86/run, as run_tests.sh
# runs it, with QEMU=scripts/tandem-qemu for Tandem's columns. The suite's
# own rules apply first: arch = i386, nodefault (unless --all), accel = kvm
# and check = ... make a SKIP; so does a command line that the VMM refuses
# (the suite's "premature failure" probe: tandem-qemu refuses what Tandem
# cannot honour, e.g. -M q35 or -device hyperv-testdev), with the reason in
# the log. A test's own timeout (the timeout = field of unittests.cfg, 90 s
# when it has none, as the suite's runner) applies with --timeout cfg.
#
# Options:
#   --backends "LIST"   columns, from: interp kvm qemu-tcg qemu-kvm
#                       (default: interp kvm, and qemu-tcg if QEMU is found)
#   --timeout SECS|cfg  per test and column (default 60); cfg: each
#                       test's own timeout from unittests.cfg
#   --timeout-interp SECS, --timeout-kvm SECS, --timeout-qemu SECS
#   --jobs N            runs at a time (default 1; times are wall clock)
#   --logs DIR          where the per-run logs and table go
#                       (default: KUT_BUILD_DIR/logs-tandem)
#   --all               include the tests marked nodefault
#   --tandem PATH       the tandem binary (default: target/release/tandem)
#
# A cell is RESULT P/F/S TIME: P, F and S come from the test's SUMMARY line
# ("~" in front when the test died before it, then they are its PASS:,
# FAIL: and SKIP: lines so far). RESULT is the suite's reading of the exit
# status: PASS (isa-debug-exit 0), FAIL (the test reported failures),
# SKIP (every check skipped, or the suite/VMM skipped the test), ABORT
# (report_abort or an unhandled exception in the guest), TIMEOUT, ERROR
# (the VMM failed: Tandem's own error, emulation failure, triple fault),
# DEAD (the guest halted with interrupts off), or rc=N.
# Logs: LOGDIR/TEST.COLUMN.log (the command line, serial output, stderr).
set -u

here=$(cd "$(dirname "$0")" && pwd)
wrapper=$here/tandem-qemu
tandem=$here/../target/release/tandem
backends=""
timeout_default=60
t_interp="" t_kvm="" t_qemu=""
jobs_max=1
logdir=""
run_all=no

usage() {
    sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --backends) backends=$2; shift 2 ;;
    --timeout) timeout_default=$2; shift 2 ;;
    --timeout-interp) t_interp=$2; shift 2 ;;
    --timeout-kvm) t_kvm=$2; shift 2 ;;
    --timeout-qemu) t_qemu=$2; shift 2 ;;
    --jobs) jobs_max=$2; shift 2 ;;
    --logs) logdir=$2; shift 2 ;;
    --all) run_all=yes; shift ;;
    --tandem) tandem=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) break ;;
    esac
done
[ $# -ge 1 ] || usage
kut=$(cd "$1" && pwd) || exit 2
shift
only=("$@")

cfg=$kut/x86/unittests.cfg
[ -f "$cfg" ] && [ -f "$kut/config.mak" ] && [ -x "$kut/x86/run" ] || {
    echo "$kut is not a configured kvm-unit-tests tree (no x86/unittests.cfg, config.mak or x86/run)" >&2
    exit 2
}
grep -q '^ARCH=x86_64' "$kut/config.mak" ||
    echo "warning: $kut is not configured with --arch=x86_64" >&2
tandem=$(cd "$(dirname "$tandem")" && pwd)/$(basename "$tandem")
[ -x "$tandem" ] || { echo "no tandem binary at $tandem (cargo build --release)" >&2; exit 2; }
qemu_bin=$(command -v qemu-system-x86_64 || true)
if [ -z "$backends" ]; then
    backends="interp kvm"
    [ -n "$qemu_bin" ] && backends+=" qemu-tcg"
fi
for b in $backends; do
    case "$b" in
    interp | kvm) ;;
    qemu-tcg | qemu-kvm) [ -n "$qemu_bin" ] || { echo "$b: qemu-system-x86_64 not found" >&2; exit 2; } ;;
    *) echo "unknown backend $b" >&2; exit 2 ;;
    esac
done
: "${logdir:=$kut/logs-tandem}"
mkdir -p "$logdir" || exit 2
logdir=$(cd "$logdir" && pwd)
rm -f "$logdir"/*.result

# The tests of unittests.cfg, one record per test (fields as the suite's
# scripts/common.bash reads them), separated by \x1f.
parse_cfg() {
    local name="" file="" smp=1 args="" opts="" groups="" arch="" check="" accel="" tmo=90 line
    emit() {
        [ -n "$name" ] && printf '%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\n' \
            "$name" "$file" "$smp" "$args" "$opts" "$groups" "$arch" "$check" "$accel" "$tmo"
    }
    while IFS= read -r line || [ -n "$line" ]; do
        if [[ "$line" =~ ^\[(.*)\]$ ]]; then
            emit
            name=${BASH_REMATCH[1]} file="" smp=1 args="" opts="" groups="" arch="" check="" accel="" tmo=90""
        elif [[ "$line" =~ ^file\ *=\ *(.*)$ ]]; then file=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^smp\ *=\ *(.*)$ ]]; then smp=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^test_args\ *=\ *(.*)$ ]]; then args=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^(extra_params|qemu_params)\ *=\ *(.*)$ ]]; then opts=${BASH_REMATCH[2]}
        elif [[ "$line" =~ ^groups\ *=\ *(.*)$ ]]; then groups=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^arch\ *=\ *(.*)$ ]]; then arch=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^check\ *=\ *(.*)$ ]]; then check=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^accel\ *=\ *(.*)$ ]]; then accel=${BASH_REMATCH[1]}
        elif [[ "$line" =~ ^timeout\ *=\ *([0-9]+)s?\ *$ ]]; then tmo=${BASH_REMATCH[1]}
        fi
    done <"$cfg"
    emit
}

# The timeout of column $1 for a test whose own timeout is $2.
timeout_for() {
    local t
    case "$1" in
    interp) t=${t_interp:-$timeout_default} ;;
    kvm) t=${t_kvm:-$timeout_default} ;;
    *) t=${t_qemu:-$timeout_default} ;;
    esac
    [ "$t" = cfg ] && t=$2
    echo "$t"
}

# The environment x86/run gets for a column.
column_env() {
    case "$1" in
    interp) echo "QEMU=$wrapper TANDEM=$tandem TANDEM_BACKEND=interp ACCEL=tcg" ;;
    kvm) echo "QEMU=$wrapper TANDEM=$tandem TANDEM_BACKEND=kvm ACCEL=kvm" ;;
    qemu-tcg) echo "QEMU=$qemu_bin ACCEL=tcg" ;;
    qemu-kvm) echo "QEMU=$qemu_bin ACCEL=kvm" ;;
    esac
}

# Counts from the log: the SUMMARY line if there is one, else the report lines.
counts() {
    local log=$1 s n f k x sk p
    s=$(tr -d '\r' <"$log" | grep -a '^SUMMARY: ' | tail -n1)
    if [ -n "$s" ]; then
        n=$(sed -n 's/^SUMMARY: \([0-9]*\) tests.*/\1/p' <<<"$s")
        f=$(grep -o '[0-9]* unexpected failures' <<<"$s" | cut -d' ' -f1)
        k=$(grep -o '[0-9]* known failures' <<<"$s" | cut -d' ' -f1)
        x=$(grep -o '[0-9]* expected failures' <<<"$s" | cut -d' ' -f1)
        sk=$(grep -o '[0-9]* skipped' <<<"$s" | cut -d' ' -f1)
        p=$((${n:-0} - ${f:-0} - ${k:-0} - ${x:-0} - ${sk:-0} + ${x:-0}))
        echo "$p/$((${f:-0} + ${k:-0}))/${sk:-0}"
    else
        p=$(tr -d '\r' <"$log" | grep -ac '^PASS: ')
        f=$(tr -d '\r' <"$log" | grep -ac '^\(FAIL\|XPASS\|KFAIL\): ')
        sk=$(tr -d '\r' <"$log" | grep -ac '^SKIP: ')
        echo "~$p/$f/$sk"
    fi
}

result_name() {
    case "$1" in
    0) echo PASS ;;
    77) echo SKIP ;;
    3) echo FAIL ;;
    124) echo TIMEOUT ;;
    127) echo ABORT ;;
    1 | 2) echo ERROR ;;
    4) echo DEAD ;;
    *)
        if [ "$1" -gt 128 ]; then echo "SIG$(($1 - 128))"; else echo "rc=$1"; fi
        ;;
    esac
}

# One test on one column; writes LOGDIR/NAME.COLUMN.result ("cell|reason").
run_one() {
    local name=$1 file=$2 smp=$3 args=$4 opts=$5 groups=$6 check=$7 accel=$8 col=$9 own=${10}
    local log="$logdir/$name.$col.log" res="$logdir/$name.$col.result"
    local env to colaccel p path value probe cmd t0 t1 rc cell
    env=$(column_env "$col")
    to=$(timeout_for "$col" "$own")
    case "$col" in interp | qemu-tcg) colaccel=tcg ;; *) colaccel=kvm ;; esac
    : >"$log"
    if [ -n "$accel" ] && [ "$accel" != "$colaccel" ]; then
        echo "SKIP|$accel only" >"$res"
        return
    fi
    if [ -n "$check" ]; then
        for p in $check; do
            path=${p%%=*} value=${p#*=}
            if ! [ -f "$path" ] || [ "$(cat "$path")" != "$value" ]; then
                echo "SKIP|check $path != $value" >"$res"
                return
            fi
        done
    fi
    [ -n "$args" ] && args="-append $args"
    # The suite's premature-failure probe: a VMM that refuses the command
    # line says so before it looks for the kernel.
    probe=$(cd "$kut" && eval "env $env TESTNAME=$name TIMEOUT=${to}s ./x86/run _NO_FILE_4Uhere_ -smp $smp $args $opts" 2>&1 </dev/null | cat)
    if ! grep -q -e "[Cc]ould not \(load\|open\) kernel" -e "error loading" -e "failed to load" <<<"$probe"; then
        printf '%s\n' "$probe" >"$log"
        echo "SKIP|refused: $(tail -n1 <<<"$probe" | tr -d '\r' | sed 's/^[^:]*qemu[^:]*: //')" >"$res"
        return
    fi
    cmd="env $env TESTNAME=$name TIMEOUT=${to}s ./x86/run x86/$file -smp $smp $args $opts"
    t0=$(date +%s.%N)
    # Through a pipe: x86/run reopens /dev/fd/1, which would rewind a file.
    (cd "$kut" && eval "$cmd") </dev/null 2>&1 | cat >>"$log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    cell="$(result_name "$rc") $(counts "$log") $(printf '%.1fs' "$(echo "$t1 - $t0" | bc)")"
    echo "$cell|" >"$res"
}

declare -a names
while IFS=$'\x1f' read -r name file smp args opts groups arch check accel own_timeout; do
    if [ ${#only[@]} -gt 0 ]; then
        found=no
        for o in "${only[@]}"; do [ "$o" = "$name" ] && found=yes; done
        [ $found = yes ] || continue
    fi
    names+=("$name")
    if [ -n "$arch" ] && [ "$arch" != x86_64 ]; then
        for col in $backends; do echo "SKIP|$arch only" >"$logdir/$name.$col.result"; done
        continue
    fi
    if [[ " $groups " == *" nodefault "* ]] && [ $run_all = no ]; then
        for col in $backends; do echo "SKIP|nodefault" >"$logdir/$name.$col.result"; done
        continue
    fi
    for col in $backends; do
        while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
        echo "running $name on $col" >&2
        run_one "$name" "$file" "$smp" "$args" "$opts" "$groups" "$check" "$accel" "$col" "$own_timeout" &
    done
done < <(parse_cfg)
wait

# The table, aligned for the terminal and as Markdown in LOGDIR/table.md.
{
    printf '| test |'
    for col in $backends; do printf ' %s |' "$col"; done
    printf '\n|---|'
    for col in $backends; do printf -- '---|'; done
    printf '\n'
    for name in "${names[@]}"; do
        printf '| %s |' "$name"
        for col in $backends; do
            r=$(cat "$logdir/$name.$col.result" 2>/dev/null || echo "?|")
            cell=${r%%|*} why=${r#*|}
            [ -n "$why" ] && cell="$cell ($why)"
            printf ' %s |' "$cell"
        done
        printf '\n'
    done
} >"$logdir/table.md"
# The terminal copy: the same rows, reasons cut short.
{
    printf 'TEST'
    for col in $backends; do printf '\t%s' "$col"; done
    printf '\n'
    for name in "${names[@]}"; do
        printf '%s' "$name"
        for col in $backends; do
            r=$(cat "$logdir/$name.$col.result" 2>/dev/null || echo "?|")
            cell=${r%%|*} why=${r#*|}
            [ -n "$why" ] && cell="$cell(${why:0:28})"
            printf '\t%s' "$cell"
        done
        printf '\n'
    done
} | column -t -s $'\t'
echo "logs and table.md in $logdir"
