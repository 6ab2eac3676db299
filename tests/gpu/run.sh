#!/usr/bin/env bash
# The GPU check of issue #8, for a lent GPU machine (< 5 minutes):
#
#   tests/gpu/run.sh            exit 0 pass, 1 a check failed, 2 set-up missing, 77 no GPU (dry run)
#
# CRIU: a system criu >= 4.2, else a private prefix carried with the tree at .cache/criu
# (on the dev machine: `FASTBOOT_CRIU_BUILD=0 bash fastboot/snapshot/provision-criu.sh
# .cache/criu`, Debian's CRIU with its own libraries, which runs on any glibc host; the patched
# build is bundled with its libraries by tests/gpu/bundle-criu.sh), else /opt/fastboot/criu.
# The prefix's bin/criu wrapper names absolute paths, so a wrapper for
# wherever the prefix is now is written to a temp dir and handed over as FASTBOOT_CRIU.
# Sizes: FASTBOOT_GPU_GIB="2 16" runs one round trip per size (GiB of device memory filled).
# FASTBOOT_GPU_COLD=1 drops the images' pages from the page cache before each restore.
# FASTBOOT_GPU_LOCK=0 skips the lock-timeout check that follows the round trips.
# FASTBOOT_GPU_CRIU_PREFIX=DIR tries that carried prefix first (e.g. the patched CRIU with its
# libraries, to measure mapped restores); FASTBOOT_GPU_TAG=T names the JSON files ..._T.json.
# Results: printed, and written to $OUT/gpu_checkpoint_<N>gib.json when $OUT is set.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    echo "tests/gpu/run.sh: no GPU on this machine (no /dev/nvidia*); dry run, nothing tried"
    [ -n "${OUT:-}" ] && printf '{"exit_code": 77, "message": "no GPU"}\n' >"$OUT/gpu_checkpoint.json"
    exit 77
fi

py=${PYTHON:-$(command -v python3)}
nvidia-smi --query-gpu=name,driver_version,memory.total,persistence_mode --format=csv || true

# shellcheck source=tests/gpu/criu-env.sh
source tests/gpu/criu-env.sh
echo "criu: ${FASTBOOT_CRIU:-$(command -v criu || echo none)}"

echo "kernel $(uname -r); cuda-bindings $("$py" -c 'import cuda.bindings as b; print(b.__version__)' 2>&1 | tail -1)"

# One round trip per size in FASTBOOT_GPU_GIB (default "2"), stopping at the first failure.
rc=0
for gib in ${FASTBOOT_GPU_GIB:-2}; do
    echo "== round trip with $gib GiB of device memory"
    json=()
    [ -n "${OUT:-}" ] && json=(--json "$OUT/gpu_checkpoint_${gib}gib${FASTBOOT_GPU_TAG:+_$FASTBOOT_GPU_TAG}.json")
    cold=()
    [ "${FASTBOOT_GPU_COLD:-0}" = 1 ] && cold=(--cold)
    timeout 280 "$py" tests/gpu/checkpoint_roundtrip.py --gib "$gib" "${cold[@]}" "${json[@]}"
    one=$?
    [ $one -eq 124 ] && echo "tests/gpu/run.sh: the $gib GiB round trip timed out after 280 s"
    [ $one -gt $rc ] && rc=$one
    [ $one -eq 0 ] || break  # a failure at one size says enough; lent GPU time is short
done

# The lock timeout on a busy process: abandoned snapshot, process runs on (< 1 minute).
if [ "${FASTBOOT_GPU_LOCK:-1}" = 1 ]; then
    echo "== lock timeout on a busy process"
    json=()
    [ -n "${OUT:-}" ] && json=(--json "$OUT/gpu_lock_timeout.json")
    timeout 200 "$py" tests/gpu/lock_timeout.py "${json[@]}"
    one=$?
    [ $one -eq 124 ] && echo "tests/gpu/run.sh: the lock check timed out after 200 s"
    [ $one -gt $rc ] && rc=$one
fi
exit $rc
