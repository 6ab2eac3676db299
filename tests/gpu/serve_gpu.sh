#!/usr/bin/env bash
# The whole serve cycle on a lent GPU machine (issue #19), in one call of at most ~8 minutes:
#
#   tests/gpu/serve_gpu.sh      exit 0 pass, 1 a check failed, 2 set-up missing, 77 no GPU (dry run)
#
# `fastboot serve --fastboot-engine command` over tests/gpu/gpu_server.py (transformers on torch,
# torch.compile(mode="reduce-overhead"): CUDA graphs captured during fastboot's warm-up), on the
# built-in tiny model (FASTBOOT_GPU_MODEL_SIZE=1gib for the larger one):
#   plain     the server alone: process start to first answer, and its greedy token ids
#   cold      fastboot: cold boot, warm-up, CUDA checkpoint + CRIU dump, publish, restore (served)
#   restore1  fastboot again: restore (no cold boot), oracle checked, served
#   restore2  once more
# After each: the same greedy request (must equal the plain server's token ids), GPU memory used
# before, while serving and after (nvidia-smi), then Ctrl-C. The logs go to $OUT (when set) and
# tests/gpu/serve_gpu_report.py turns them into $OUT/serve_gpu.json.
#
# Carry: the tree (fastboot runs from it), .cache/criu-mapped (tests/gpu/bundle-criu.sh; or
# .cache/criu) and .whl (the blake3 wheel the GPU image lacks; tests/gpu/README.md says how).
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    echo "tests/gpu/serve_gpu.sh: no GPU on this machine (no /dev/nvidia*); dry run, nothing tried"
    [ -n "${OUT:-}" ] && printf '{"exit_code": 77, "message": "no GPU"}\n' >"$OUT/serve_gpu.json"
    exit 77
fi
[ "$(id -u)" = 0 ] || { echo "tests/gpu/serve_gpu.sh: CRIU needs root"; exit 2; }

py=${PYTHON:-$(command -v python3)}
site=$(mktemp -d)
if ! "$py" -c "import blake3" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 2
fi
export PYTHONPATH=$repo:$site
export PYTHONUNBUFFERED=1
# shellcheck source=tests/gpu/criu-env.sh
source tests/gpu/criu-env.sh
[ -n "${FASTBOOT_CRIU:-}" ] || command -v criu >/dev/null || { echo "no criu >= 4.2"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

work=${OUT:-$(mktemp -d)}/serve_gpu
mkdir -p "$work"
model=$(mktemp -d)/model
"$py" -m fastboot model tiny --size "${FASTBOOT_GPU_MODEL_SIZE:-tiny}" --out "$model" >/dev/null || exit 2
port=18200
server=("$py" tests/gpu/gpu_server.py --model "{model}" --host "{host}" --port "{port}" --compile)
request='{"prompt": "fastboot restores a warmed engine on a GPU", "max_tokens": 16}'

gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }

# wait_for NAME PID PATTERN DEADLINE_S: until the log has PATTERN (0), the process exits or the
# deadline passes (1).
wait_for() {
    local end=$((SECONDS + $4))
    while [ $SECONDS -lt "$end" ]; do
        grep -qE "$3" "$work/$1.log" && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}

# ask NAME: the greedy request, answered into NAME.answer.json; GPU memory while serving.
ask() {
    curl -sf -m 60 "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
        -d "$request" >"$work/$1.answer.json"
    gpu_used >>"$work/$1.gpu"
}

stop() { # stop PID SIGNAL: and wait for it, killing its group after 60 s
    kill -"$2" "$1" 2>/dev/null
    for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 -- "-$1" 2>/dev/null
}

# plain: the server by itself, timed from start to its first answer.
gpu_used >"$work/plain.gpu"
start=$("$py" -c "import time; print(time.time())")
listen=("${server[@]//\{model\}/$model}")
listen=("${listen[@]//\{host\}/127.0.0.1}")
setsid "${listen[@]//\{port\}/$port}" >"$work/plain.log" 2>&1 &
pid=$!
until curl -sf -m 60 "http://127.0.0.1:$port/v1/completions" -d "$request" >/dev/null; do
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
done
"$py" -c "import sys, time; print(time.time() - float(sys.argv[1]))" "$start" >"$work/plain.seconds"
ask plain
stop $pid TERM
gpu_used >>"$work/plain.gpu"

for run in cold restore1 restore2; do
    deadline=120
    [ $run = cold ] && deadline=300
    gpu_used >"$work/$run.gpu"
    setsid "$py" -m fastboot serve "$model" --fastboot-engine command --host 127.0.0.1 \
        --port $port --fastboot-snapshot-dir "$work/snapshots" -- "${server[@]}" \
        >"$work/$run.log" 2>&1 &
    pid=$!
    if wait_for $run $pid "restored snapshot|serving without a snapshot" $deadline; then
        ask $run
    else
        echo "tests/gpu/serve_gpu.sh: $run did not serve within $deadline s"
    fi
    stop $pid INT
    gpu_used >>"$work/$run.gpu"
    grep " fastboot " "$work/$run.log"
done
rm -rf "$work/snapshots" "$(dirname "$model")" "$site"
"$py" tests/gpu/serve_gpu_report.py "$work" --json "${OUT:-$work}/serve_gpu.json"
