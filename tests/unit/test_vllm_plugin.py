"""fastboot's vLLM plugin against the installed vLLM: the CPU reader-spin limit."""

from __future__ import annotations

import subprocess
import sys

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
