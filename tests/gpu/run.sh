#!/usr/bin/env bash
# The GPU check of issue #8, for a lent GPU machine (< 5 minutes):
#
#   tests/gpu/run.sh            exit 0 pass, 1 a check failed, 2 set-up missing, 77 no GPU (dry run)
#
# CRIU: a system criu >= 4.2, else a private prefix carried with the tree at .cache/criu
# (on the dev machine: `FASTBOOT_CRIU_BUILD=0 bash fastboot/snapshot/provision-criu.sh
# .cache/criu`, Debian's CRIU with its own libraries, which runs on any glibc host; the patched
# build links the dev machine's libraries), then carry ".cache/criu"), else /opt/fastboot/criu.
# The prefix's bin/criu wrapper names absolute paths, so a wrapper for
# wherever the prefix is now is written to a temp dir and handed over as FASTBOOT_CRIU.
# Results: printed, and written to $OUT/gpu_checkpoint.json when $OUT is set.
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

if [ -z "${FASTBOOT_CRIU:-}" ] && ! { command -v criu >/dev/null && criu --version | grep -qE 'Version: (4\.([2-9]|[1-9][0-9])|[5-9])'; }; then
    for prefix in "$repo/.cache/criu" /opt/fastboot/criu; do
        [ -d "$prefix/root" ] || continue
        lib=$(ls -d "$prefix"/root/usr/lib/*-linux-gnu | head -1)
        loader=$(ls "$lib"/ld-linux-*.so.* | head -1)
        wrapper=$(mktemp -d)/criu
        printf '#!/bin/sh\nexec "%s" --library-path "%s" "%s/root/usr/sbin/criu" "$@"\n' \
            "$loader" "$lib" "$prefix" >"$wrapper"
        chmod +x "$wrapper"
        export FASTBOOT_CRIU=$wrapper
        break
    done
fi
echo "criu: ${FASTBOOT_CRIU:-$(command -v criu || echo none)}"

json=()
[ -n "${OUT:-}" ] && json=(--json "$OUT/gpu_checkpoint.json")
timeout 280 "$py" tests/gpu/checkpoint_roundtrip.py --gib "${FASTBOOT_GPU_GIB:-2}" "${json[@]}"
rc=$?
[ $rc -eq 124 ] && echo "tests/gpu/run.sh: timed out after 280 s"
exit $rc
