"""The per-process io_uring blocker, against the real kernel."""

from __future__ import annotations

import errno
import subprocess
import sys

from fastboot.host import iouring

PROBE = "from fastboot.host.iouring import io_uring_setup_errno as e; print(e())"


def test_filter_program_shape() -> None:
    program = iouring.filter_program("x86_64")
    assert len(program) % 8 == 0
    # load arch, check arch, load nr, one compare per syscall, allow, errno
    assert len(program) // 8 == 3 + len(iouring.IO_URING_SYSCALLS) + 2


def test_wrapped_child_gets_enosys_and_the_parent_is_untouched() -> None:
    wrapped = subprocess.run(
        iouring.wrap([sys.executable, "-c", PROBE]), capture_output=True, text=True, check=True
    )
    assert int(wrapped.stdout) == errno.ENOSYS
    plain = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    )
    expected = {0: 0, 1: 0, 2: errno.EPERM}.get(iouring.sysctl_value() or 0)
    # root may create rings when the sysctl says "root only"
    assert int(plain.stdout) == expected


def test_uvloop_falls_back_to_epoll_under_the_filter() -> None:
    code = (
        "import asyncio, os, uvloop\n"
        "async def main():\n"
        "    await asyncio.sleep(0)\n"
        "    links = []\n"
        "    for fd in os.listdir('/proc/self/fd'):\n"
        "        try: links.append(os.readlink(f'/proc/self/fd/{fd}'))\n"
        "        except OSError: pass\n"
        "    print(sorted(set(l for l in links if l.startswith('anon_inode'))))\n"
        "uvloop.run(main())\n"
    )
    out = subprocess.run(
        iouring.wrap([sys.executable, "-c", code]), capture_output=True, text=True, check=True
    )
    assert "io_uring" not in out.stdout
    assert "eventpoll" in out.stdout


def test_usage_without_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastboot.host.iouring"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "usage" in out.stderr
