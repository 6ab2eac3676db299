"""fastboot's vLLM plugin against the installed vLLM: the CPU reader-spin limit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: Runs in a fresh interpreter so the patch does not leak into other tests.
PROBE = """
import zmq
from vllm.distributed.device_communicators import shm_broadcast
from fastboot_patches import vllm_plugin

ctx = zmq.Context()
address = "inproc://fastboot-spin-test"
before = shm_broadcast.SpinCondition(True, ctx, address).busy_loop_s
assert vllm_plugin.limit_reader_spin(0.02)
assert vllm_plugin.limit_reader_spin(0.5)  # idempotent: the first limit stays
after = shm_broadcast.SpinCondition(is_reader=True, context=ctx, notify_address=address)
explicit = shm_broadcast.SpinCondition(True, ctx, address, busy_loop_s=3)
print(before, after.busy_loop_s, explicit.busy_loop_s)
"""


def test_reader_spin_is_limited_once_and_explicit_values_win() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    before, after, explicit = map(float, result.stdout.split()[-3:])
    assert before == 1.0  # vLLM's own default, which the plugin changes on CPU
    assert after == 0.02
    assert explicit == 3.0


#: The executor is imported first, as in an engine where it was loaded before the plugin ran.
FILE_STORE_PROBE = """
import sys
from vllm.v1.executor import multiproc_executor
from vllm.utils import network_utils
from fastboot_patches import vllm_plugin

directory = sys.argv[1]
assert vllm_plugin.keep_file_store_in(directory)
assert vllm_plugin.keep_file_store_in("/elsewhere")  # idempotent: the first directory stays
print(network_utils.get_file_store_init_method())
print(multiproc_executor.get_file_store_init_method())
print(network_utils.get_file_store_init_method())
"""


def test_file_store_moves_to_the_run_directory_in_modules_already_imported(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FILE_STORE_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first, executor, second = result.stdout.split()[-3:]
    for url in (first, executor, second):
        assert url.startswith(f"file://{tmp_path}/vllm_dist_"), url
    assert len({first, executor, second}) == 3  # a fresh name per engine, as vLLM makes them


#: Runs as a child of pid 1 of a pid namespace whose /proc is its parent namespace's, as an
#: engine of fastboot serve in a container: its own pid names no process in that /proc.
OWN_PROC_PROBE = """
import os
from vllm.utils import cpu_resource_utils
from fastboot_patches import vllm_plugin

try:
    before = str(cpu_resource_utils.get_memory_affinity())
except FileNotFoundError:
    before = "missing"
assert vllm_plugin.read_own_proc_status()
after = cpu_resource_utils.get_memory_affinity()
print(os.getpid(), before, ",".join(map(str, after)))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)"
)
def test_memory_affinity_is_read_from_the_engines_own_proc_entry() -> None:
    # The outer namespace gets a /proc of its own with a handful of processes; the inner one
    # keeps it, and starts 30 processes first so the probe's pid is not among them.
    inner = f'for i in $(seq 30); do /bin/true; done; {sys.executable} -c "$FASTBOOT_PROBE"'
    result = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--",
            "unshare",
            "--pid",
            "--fork",
            "--",
            "sh",
            "-c",
            inner,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "FASTBOOT_PROBE": OWN_PROC_PROBE},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pid, before, after = result.stdout.split()[-3:]
    assert int(pid) > 30
    assert before == "missing"  # vLLM's own lookup: /proc/<pid in the namespace> is not there
    with open("/proc/self/status") as status:
        line = next(ln for ln in status if ln.startswith("Mems_allowed_list:"))
    nodes: list[int] = []
    for part in line.split(":", 1)[1].strip().split(","):
        first, _, last = part.partition("-")
        nodes += range(int(first), int(last or first) + 1)
    assert after == ",".join(map(str, nodes))  # this host's nodes, as the engine's own entry says
