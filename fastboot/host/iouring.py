"""Keep io_uring out of the engine process tree, per process, with a seccomp filter.

CRIU cannot dump an io_uring instance ("Unknown ... anon_inode:[io_uring]"), and uvloop's libuv
opens one even with UV_USE_IO_URING=0. The host-wide switch (`sysctl kernel.io_uring_disabled=2`)
works but changes every process on the machine. Instead, the engine is exec'd through
`python -m fastboot.host.iouring -- CMD...`, which installs a seccomp filter that makes
io_uring_setup(2) fail with ENOSYS, exactly what an older kernel answers; libuv (and anything
else) then falls back to epoll. The filter is inherited by every descendant and CRIU saves and
restores it with the process, so restored engines keep it too.

The filter needs CAP_SYS_ADMIN or no_new_privs; as non-root, no_new_privs is set first.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from pathlib import Path

# <linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>
_BPF_LD_W_ABS = 0x20
_BPF_JMP_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_OFFSET_NR, _OFFSET_ARCH = 0, 4  # struct seccomp_data: int nr; __u32 arch; ...

#: io_uring_setup, io_uring_enter, io_uring_register: 425-427 in the generic table, which
#: x86_64 and aarch64 share for these calls.
IO_URING_SYSCALLS = (425, 426, 427)
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def filter_program(arch: str | None = None) -> bytes:
    """The BPF program: ENOSYS for io_uring syscalls of this architecture, allow the rest."""
    audit_arch = _AUDIT_ARCH.get(arch or platform.machine())
    if audit_arch is None:
        raise OSError(errno.ENOTSUP, f"no io_uring filter for architecture {platform.machine()}")
    n = len(IO_URING_SYSCALLS)
    prog = [
        _insn(_BPF_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        # Another ABI (x32, ia32 compat) numbers syscalls differently: leave it alone.
        _insn(_BPF_JMP_JEQ_K, 0, n + 2, audit_arch),
        _insn(_BPF_LD_W_ABS, 0, 0, _OFFSET_NR),
    ]
    for i, nr in enumerate(IO_URING_SYSCALLS):
        # On a match jump to the ERRNO return, which sits after the remaining compares + ALLOW.
        prog.append(_insn(_BPF_JMP_JEQ_K, n - i, 0, nr))
    prog.append(_insn(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    prog.append(_insn(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS))
    return b"".join(prog)


def block_io_uring() -> None:
    """Install the filter on the calling thread's process (inherited across fork and exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    program = filter_program()
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if os.geteuid() != 0 and libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


def io_uring_setup_errno() -> int:
    """Call io_uring_setup(1, params) here: 0 when an instance was created (and closed), else
    the errno (ENOSYS when filtered or unsupported, EPERM when disabled by sysctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = ctypes.create_string_buffer(120)  # sizeof(struct io_uring_params)
    fd = libc.syscall(ctypes.c_long(IO_URING_SYSCALLS[0]), ctypes.c_uint(1), params)
    if fd >= 0:
        os.close(fd)
        return 0
    return ctypes.get_errno()


def sysctl_value() -> int | None:
    """kernel.io_uring_disabled (0 enabled, 1 root only, 2 disabled), or None if absent."""
    try:
        return int(Path("/proc/sys/kernel/io_uring_disabled").read_text())
    except (OSError, ValueError):
        return None


def wrap(argv: list[str], setsid: bool = False) -> list[str]:
    """`argv` run through the io_uring blocker with the current interpreter.

    setsid: also start a new session first. CRIU refuses to dump a pid namespace whose init's
    session leader lives outside it ("A session leader of N(1) is outside of its pid namespace").
    """
    return [
        sys.executable,
        "-m",
        "fastboot.host.iouring",
        *(["--setsid"] * setsid),
        "--",
        *argv,
    ]


def main(argv: list[str]) -> int:
    setsid = argv[:1] == ["--setsid"]
    argv = argv[1:] if setsid else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(
            "usage: python -m fastboot.host.iouring [--setsid] -- CMD [ARGS...]",
            file=sys.stderr,
        )
        return 2
    if setsid and os.getsid(0) != os.getpid():
        os.setsid()
    block_io_uring()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
