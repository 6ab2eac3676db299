"""A real static HTTP server for tests and benchmarks: nginx on 127.0.0.1, serving one directory.

    with Nginx(root=remote_dir, workdir=tmp) as server:
        pull(store, "env", server.url)

`start` waits (with a deadline) until the port accepts connections and fails with nginx's error
log if nginx exits first; `stop` ends it (SIGTERM, then SIGKILL) and reaps it. The same port is
reused across stop/start, so a test can take the remote down and bring it back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from fastboot.errors import DependencyError, RemoteError

CONFIG = """\
worker_processes 2;
daemon off;
master_process on;
user root;
error_log {work}/error.log warn;
pid {work}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    sendfile on;
    # TCP_CORK (tcp_nopush) held the tail of small ranged responses for ~40 ms here.
    tcp_nopush off;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Nginx:
    """nginx serving `root` on a free loopback port."""

    def __init__(self, root: Path, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise DependencyError("nginx is missing; install it (`apt-get install nginx-light`)")
        self.binary = binary
        self.root = root
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "nginx.conf"
        self.config.write_text(CONFIG.format(work=workdir, port=self.port, root=root))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "error.log").read_text()
        return ""

    def start(self, deadline_s: float = 15.0) -> None:
        with open(self.workdir / "stderr.log", "ab") as stderr:
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(self.workdir), "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        end = time.monotonic() + deadline_s
        while True:
            if self.proc.poll() is not None:
                raise RemoteError(f"nginx exited ({self.proc.returncode}): {self.error_log}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            if time.monotonic() > end:
                self.stop()
                raise RemoteError(f"nginx did not listen in {deadline_s} s: {self.error_log}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # The workers are in the master's process group; make sure none outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def torch_venv(dest: Path, python: str | None = None) -> Path:
    """A small virtual environment at `dest` with torch and exactly the top-level packages that
    `import torch` loads from this interpreter's site-packages, hardlinked (copied across
    filesystems). Its bin/python runs `import torch` from wherever the tree is (an image)."""
    import sys
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch\n"
            f"site = {str(site)!r} + '/'\n"
            "for m in list(sys.modules.values()):\n"
            "    f = getattr(m, '__file__', None) or ''\n"
            "    if f.startswith(site): print(f[len(site):].split('/')[0])\n",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    tops = sorted(
        {t for t in probe.stdout.split() if not t.startswith(("__editable__", "_distutils_hack"))}
    )
    base = python or os.path.realpath(sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(dest)], check=True, timeout=120)
    target = dest / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    for top in tops:
        for name in (top, f"{top}.libs"):
            src = site / name
            if src.is_dir():
                shutil.copytree(src, target / name, copy_function=_link_or_copy, symlinks=True)
            elif src.exists():
                _link_or_copy(str(src), str(target / name))
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
