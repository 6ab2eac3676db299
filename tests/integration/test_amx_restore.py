"""A process that used AMX before its dump still may after its restore (fastboot's CRIU patch).

The kernel lets a process run AMX tile instructions only after it asked (arch_prctl
ARCH_REQ_XCOMP_PERM for XTILEDATA); CRIU does not dump that permission, so a restored vLLM
worker whose oneDNN kernels had used AMX died of SIGILL at its first request (every restore on
an AMX host fell back to a cold boot). A small torch process here multiplies bfloat16 matrices
(oneDNN picks AMX kernels where the CPU has them) and answers the product's digest and its
permission bits over TCP; after a real dump and restore it must answer the same, alive.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastboot.snapshot import criu as criu_mod
from tests.engine_process import free_port
from tests.integration.test_page_mapping import (
    ask,
    dump_holder,
    kill_and_reap,
    restore,
    subreaper,
)

__all__ = ["subreaper"]  # the fixture, used by name

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores need root"),
    pytest.mark.skipif(
        "amx_tile" not in Path("/proc/cpuinfo").read_text(), reason="this CPU has no AMX"
    ),
]

XTILEDATA = 1 << 18
#: Multiplies bfloat16 matrices; each connection gets "PERMISSION_BITS DIGEST" of a new product.
HOLDER = r"""
import ctypes, hashlib, socket, sys
import torch
libc = ctypes.CDLL(None, use_errno=True)
def permission():
    bits = ctypes.c_uint64()
    libc.syscall(158, 0x1022, ctypes.byref(bits))  # arch_prctl(ARCH_GET_XCOMP_PERM)
    return bits.value
torch.manual_seed(0)
a, b = (torch.randn(512, 512).to(torch.bfloat16) for _ in range(2))
def answer():
    digest = hashlib.sha256((a @ b).float().numpy().tobytes()).hexdigest()
    return f"{permission()} {digest}".encode()
answer()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen()
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.recv(16)
        conn.sendall(answer())
"""


def test_a_restored_process_keeps_using_amx(tmp_path: Path, subreaper: None) -> None:
    criu = criu_mod.find_criu()
    if not criu.maps_pages:
        pytest.skip(f"{criu.path} lacks fastboot's patch (`fastboot install-criu` builds it)")
    port = free_port()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # CRIU needs the tree's session leader inside it
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line == b"ready\n", line + holder.stdout.read()
        permission, dumped = ask(port, deadline_s=60).split()
        if not int(permission) & XTILEDATA:
            pytest.skip("torch's kernels did not ask for AMX on this host")
        images, stdio_pipe = dump_holder(criu, holder, tmp_path)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    pid, _ = restore(criu, images, tmp_path / "restored", stdio_pipe)
    try:
        answer = ask(port)
        assert answer, "the restored process died computing (SIGILL at its first AMX tile op?)"
        permission, digest = answer.split()
        assert int(permission) & XTILEDATA, "the restored process lost its AMX permission"
        assert digest == dumped
        with open(f"/proc/{pid}/stat") as stat:
            assert stat.read().split()[2] != "Z", "the restored process died"
    finally:
        kill_and_reap(pid)
