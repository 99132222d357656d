#!/usr/bin/env bash
# Rebuild the SpiNNaker C code of ~/sPyNNakerGit in dependency order.
#
# usage: support/automatic_make.sh
#
# The directories come from support/make_order.txt (one "DIRECTORY [install]"
# per line, relative to ~/sPyNNakerGit; the set-up writes it, the shipped order
# being spinnaker_tools, spinn_common, SpiNNFrontEndCommon's c_common, then
# sPyNNaker/neural_modelling). Each is cleaned, built, and installed where
# marked. A directory that is not there is skipped. The first failure stops the
# build with the directory's name and the compiler's messages.
#
# Environment: GP is the cross-compiler prefix (default arm-none-eabi, so the
# compiler is arm-none-eabi-gcc; Debian/Ubuntu: apt install gcc-arm-none-eabi
# libnewlib-arm-none-eabi). SPINN_DIRS and NEURAL_MODELLING_DIRS default to
# the clones in ~/sPyNNakerGit. MAKE_JOBS sets make's -j (default 1).
set -euo pipefail
export LC_ALL=C

case "${1:-}" in
    -h|--help) sed -n '2,20s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "") ;;
    *) echo "automatic_make: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac

SUPPORT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${SPINNAKER_GIT_ROOT:-$(dirname "$SUPPORT_DIR")}"
LOG_DIR="$SUPPORT_DIR/logs"
mkdir -p "$LOG_DIR"

export GP="${GP:-arm-none-eabi}"
export SPINN_DIRS="${SPINN_DIRS:-$ROOT/spinnaker_tools}"
export NEURAL_MODELLING_DIRS="${NEURAL_MODELLING_DIRS:-$ROOT/sPyNNaker/neural_modelling}"
JOBS="${MAKE_JOBS:-1}"

if ! command -v "$GP-gcc" >/dev/null 2>&1; then
    echo "automatic_make: the compiler '$GP-gcc' was not found on PATH." >&2
    echo "  Install the ARM toolchain (Debian/Ubuntu: apt install gcc-arm-none-eabi libnewlib-arm-none-eabi)" >&2
    echo "  or set GP to the prefix of your cross compiler." >&2
    exit 2
fi

if [ ! -f "$SUPPORT_DIR/make_order.txt" ]; then
    echo "automatic_make: $SUPPORT_DIR/make_order.txt is missing: it lists the directories to build," >&2
    echo "  one 'DIRECTORY [install]' per line. The shipped order:" >&2
    echo "  ${SPINNAKER_GIT_SUPPORT_DIR:-<the project>/kernels/spynnaker-git/support}/make_order.txt" >&2
    exit 2
fi
DIRS=(); INSTALL=()
while read -r dir flag _; do
    case "$dir" in ''|'#'*) continue ;; esac
    DIRS+=("$dir"); INSTALL+=("${flag:-}")
done < "$SUPPORT_DIR/make_order.txt"

failed() {  # failed DIR STEP STATUS LOG
    echo >&2
    case "$2" in
        "(source"*) echo "automatic_make: FAILED in $1 ($2 exited with status $3)" >&2 ;;
        *) echo "automatic_make: FAILED in $1 ('make $2' exited with status $3)" >&2 ;;
    esac
    local msgs
    msgs=$(grep -E -i '(error|undefined reference|no rule to make|cannot find|not found)' "$4" | head -n 20 || true)
    if [ -n "$msgs" ]; then
        echo "compiler messages:" >&2
        printf '%s\n' "$msgs" | sed 's/^/  /' >&2
    else
        echo "last lines of the output:" >&2
        tail -n 20 "$4" | sed 's/^/  /' >&2
    fi
    echo "full log: $4" >&2
    exit 1
}

run_make() {  # run_make DIR LOG TARGET...; output to the terminal and the log
    local dir="$1" log="$2"; shift 2
    echo "+ make -C $dir $*" >> "$log"
    make -j"$JOBS" -C "$ROOT/$dir" "$@" 2>&1 | tee -a "$log"
}

built=0
for i in "${!DIRS[@]}"; do
    dir="${DIRS[$i]%/}"
    if [ ! -d "$ROOT/$dir" ]; then
        echo "automatic_make: skip $dir (not present)"
        continue
    fi
    log="$LOG_DIR/make-${dir//\//_}.log"
    : > "$log"
    echo "automatic_make: building $dir"
    # a directory may bring its own environment (spinnaker_tools/setup)
    for setup in setup.bash setup; do
        if [ -f "$ROOT/$dir/$setup" ]; then
            pushd "$ROOT/$dir" >/dev/null
            set +u
            # shellcheck disable=SC1090
            source "./$setup" >> "$log" 2>&1 || { st=$?; set -u; popd >/dev/null; failed "$dir" "(source $setup)" "$st" "$log"; }
            set -u
            popd >/dev/null
        fi
    done
    run_make "$dir" "$log" clean || failed "$dir" clean $? "$log"
    make -C "$ROOT/$dir" install-clean >/dev/null 2>&1 || true  # most directories have none
    run_make "$dir" "$log" || failed "$dir" all $? "$log"
    if [ "${INSTALL[$i]}" = install ]; then
        run_make "$dir" "$log" install || failed "$dir" install $? "$log"
    fi
    built=$((built + 1))
done
echo "automatic_make: built $built director$([ "$built" -eq 1 ] && echo y || echo ies) with $GP-gcc"
