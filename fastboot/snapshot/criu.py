"""Finding and running CRIU.

fastboot needs CRIU >= 4.2 on kernels >= 6.x (facts measured here, see FACTS.md):
criu 3.17 fails with "Unexpected rt vDSO area bounds", and 4.1.1 cannot dump TCP sockets on
kernels >= 6.16 ("Can't get 1:16 opt", SO_PASSCRED). Where the system's criu is older,
`fastboot install-criu` builds one with fastboot's patch (below) into a private prefix, or where
that fails unpacks Debian unstable's criu there with its own loader and libraries (the system
libc is never replaced; provision-criu.sh); this module finds it there.

Search order: $FASTBOOT_CRIU, then `criu` on PATH if new enough, then the private prefix; among
new enough ones, one with fastboot's patch (below) wins.

Page mapping (fastboot's CRIU patch, patches/criu-mmap-page-image.patch): upstream CRIU restores
a process's memory by reading every page of the page images into fresh anonymous memory, so a
restore costs a copy of the image (1.4 GB, 0.7 CPU-seconds for the tiny CPU engine) and K
restores of one snapshot hold K copies. With `--mmap-page-image` runs of pages are mapped
MAP_PRIVATE from the image file instead: a restore costs mappings, and every restore of one
snapshot on a host shares the image's page cache until it writes a page (docs/replicas.md).
fastboot passes it whenever the CRIU has it, except:
  - FASTBOOT_COPY_PAGES=1 turns it off;
  - images on a FUSE filesystem (a snapshot served lazily by ImageFS) are copied: a mapping
    would tie the restored engine to the FUSE daemon for as long as it runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastboot import envs
from fastboot.errors import CriuError, CriuMissingError
from fastboot.host.proctree import held_signals, kill_tree, stat_fields

logger = logging.getLogger(__name__)

MIN_VERSION = (4, 2)
_VERSION_RE = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.MULTILINE)
INSTALL_HINT = "run `fastboot install-criu` as root, or set FASTBOOT_CRIU to a criu >= 4.2"


@dataclass(frozen=True)
class Criu:
    """A CRIU executable and the version it reported."""

    path: str
    """The executable (may be fastboot's wrapper around a private prefix)."""
    version: tuple[int, int, int]
    """(major, minor, patch) from `criu --version`."""
    maps_pages: bool = False
    """It has fastboot's `--mmap-page-image` (see the module doc)."""

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def check(self, timeout: float = 60.0) -> str:
        """Run `criu check`; returns its output, raises CriuError when the kernel falls short."""
        try:
            returncode, output = _run([self.path, "check"], timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CriuError("check", str(exc)) from exc
        output = output.strip()
        if returncode != 0:
            lines = [ln for ln in output.splitlines() if "Error" in ln] or output.splitlines()
            raise CriuError("check", lines[-1] if lines else f"exit code {returncode}")
        return output


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The version in `criu --version` output ("Version: 4.2.1"), or None."""
    match = _VERSION_RE.search(text)
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


#: The restore option of fastboot's CRIU patch.
PAGE_MAPPING = "--mmap-page-image"
#: Where `restore` has criu write the restored root's pid, in its work dir.
RESTORED_PIDFILE = "restored.pid"


def _output(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("%s does not run: %s", argv[0], exc)
        return None
    return result.stdout + result.stderr


def probe(path: str) -> Criu | None:
    """Run `path --version` (and --help, for the patch); a Criu when it answers with a version,
    else None. Remembered per file version: every restore looks CRIU up again (an agent's K
    restores too), and two runs of it per candidate would cost each one ~10 ms."""
    try:
        st = os.stat(path)
    except OSError:
        return _probe(path)
    return _probe_file(path, st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=16)
def _probe_file(path: str, mtime_ns: int, size: int, inode: int) -> Criu | None:
    return _probe(path)


def _probe(path: str) -> Criu | None:
    version = parse_version(_output([path, "--version"]) or "")
    if version is None:
        return None
    return Criu(path, version, PAGE_MAPPING in (_output([path, "--help"]) or ""))


def candidates() -> list[str]:
    """Executables to try, in order of preference."""
    found = []
    if override := envs.criu_override():
        return [override]
    if on_path := shutil.which("criu"):
        found.append(on_path)
    private = envs.criu_prefix() / "bin" / "criu"
    if os.access(private, os.X_OK):
        found.append(str(private))
    return found


def find_criu() -> Criu:
    """The CRIU to use: the first candidate that is new enough.

    Raises CriuMissingError naming what was found and how to get a new enough one.
    """
    seen, usable = [], []
    for path in candidates():
        criu = probe(path)
        if criu is None:
            seen.append(f"{path} (does not run)")
        elif criu.version[:2] < MIN_VERSION:
            seen.append(f"{path} ({criu.version_text}, too old)")
        else:
            usable.append(criu)
    if usable:
        return next((criu for criu in usable if criu.maps_pages), usable[0])
    need = ".".join(map(str, MIN_VERSION))
    found = "; found " + ", ".join(seen) if seen else ""
    raise CriuMissingError(f"fastboot needs criu >= {need}{found}; {INSTALL_HINT}")


def provision_script() -> Path:
    """The shipped script that installs a private CRIU (see its header)."""
    return Path(__file__).with_name("provision-criu.sh")


#: Options for dumping and restoring an engine tree (measured on vLLM's CPU tree):
#: --shell-job: the tree has its own session, but CRIU still sees a controlling-terminal-less
#:   session leader; --tcp-established: the API server's sockets; --ext-unix-sk: ZMQ ipc://
#:   sockets whose peers may be outside a partially dumped tree; --file-locks: torch/vLLM locks;
#: --link-remap: multiprocessing semaphores are unlinked /dev/shm files that stay mapped.
TREE_OPTIONS = ("--shell-job", "--tcp-established", "--ext-unix-sk", "--file-locks", "--link-remap")


def _run_criu(
    criu: Criu,
    operation: str,
    argv: list[str],
    images: Path,
    workdir: Path,
    pass_fds: tuple[int, ...] = (),
    timeout: float = 600,
) -> None:
    """Run one CRIU operation. Logs and stats go to workdir, never into the images: a published
    snapshot is immutable (its manifest lists every file), and restores may run concurrently."""
    log = workdir / f"{operation}.log"
    command = [
        criu.path,
        operation,
        "--images-dir",
        str(images),
        "--work-dir",
        str(workdir),
        "--log-file",
        str(log),
        "-v4",
        *TREE_OPTIONS,
        *argv,
    ]
    logger.debug("running %s", " ".join(command))
    try:
        returncode, output = _run(command, timeout, pass_fds)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CriuError(operation, str(exc), log) from exc
    if returncode != 0:
        raise CriuError(operation, _first_error(log, output), log)


def _run(command: list[str], timeout: float, pass_fds: tuple[int, ...] = ()) -> tuple[int, str]:
    """Run criu to the end; (exit code, stdout + stderr). On a timeout or an exception (a
    Ctrl-C), criu is killed with everything it started (see fastboot.host.proctree)."""
    proc: subprocess.Popen[str] | None = None
    try:
        with held_signals():
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                pass_fds=pass_fds,
                process_group=0,
            )
        output, _ = proc.communicate(timeout=timeout)
    except BaseException:
        if proc is not None:
            kill_tree(proc)
        raise
    return proc.returncode, output


def _first_error(log: Path, output: str) -> str:
    """CRIU's most telling line: the first Error that is not the harmless rlimit warning."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = output.splitlines()
    errors = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    return (errors or lines or ["no output"])[0].strip()


def dump(
    criu: Criu,
    tree_pid: int,
    images: Path,
    workdir: Path,
    extra: tuple[str, ...] = (),
) -> None:
    """Dump the tree rooted at tree_pid into images; the tree is killed when the dump succeeds
    (on failure CRIU resumes it). Not --leave-running: with it CRIU removes the link-remap files
    that a restore needs."""
    images.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = ["--tree", str(tree_pid), *extra]
    _run_criu(criu, "dump", argv, images, workdir)


def on_fuse(path: Path, mounts: Path = Path("/proc/self/mounts")) -> bool:
    """Whether path lies on a FUSE filesystem (the mount with the longest matching prefix)."""
    target, best, fstype = os.path.realpath(path), "", ""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mountpoint = fields[1].replace("\\040", " ")
        inside = target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= len(best):
            best, fstype = mountpoint, fields[2]
    return fstype.startswith("fuse") and fstype != "fusectl"  # fuse, fuse.NAME, fuseblk


def maps_pages(criu: Criu, images: Path, from_mount: bool = False) -> bool:
    """Whether a restore of images maps its pages instead of copying them (module doc). On
    FUSE only from_mount: a lazily mounted remote snapshot that fastboot keeps mounted for as
    long as the replica lives (fastboot.imagefs.lazy_snapshots); a mapping is how such a restore
    fetches only the pages that are touched."""
    if not criu.maps_pages or envs.copy_pages():
        return False
    return from_mount or not on_fuse(images)


def restore(
    criu: Criu,
    images: Path,
    workdir: Path,
    stdio_pipe: str,
    stdio_fd: int,
    extra: tuple[str, ...] = (),
    pass_fds: tuple[int, ...] = (),
    from_mount: bool = False,
) -> int:
    """Restore detached; the engine's stdout/stderr pipe is replaced by stdio_fd (the write end of
    a new pipe). Returns the restored root's pid (a child of the nearest subreaper). from_mount:
    see maps_pages."""
    pidfile = workdir / RESTORED_PIDFILE
    argv = ["--restore-detached", "--pidfile", str(pidfile)]
    lazy = None
    if from_mount and envs.lazy_pages():
        lazy = start_lazy_pages(criu, images, workdir)
        argv.append("--lazy-pages")
    elif maps_pages(criu, images, from_mount):
        argv.append(PAGE_MAPPING)
    argv += ["--inherit-fd", f"fd[{stdio_fd}]:{stdio_pipe}", *extra]
    fds = (stdio_fd, *pass_fds)
    try:
        _run_criu(criu, "restore", argv, images, workdir, pass_fds=fds)
        pid = int(pidfile.read_text().strip())
    except BaseException:
        if lazy is not None:
            kill_tree(lazy.proc)
        raise
    if lazy is not None:
        lazy.watch(pid)
    return pid


#: Where `criu lazy-pages` listens for the restore, in the work dir (CRIU's fixed name).
LAZY_PAGES_SOCKET = "lazy-pages.socket"


@dataclass
class LazyPages:
    """A running `criu lazy-pages` daemon (start_lazy_pages)."""

    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    def watch(self, tree_pid: int) -> None:
        """Reap the daemon from a thread once it is done. One that fails before it copied every
        page would leave the restored tree reading zeros where its pages never came
        (userfaultfd's ranges fall back to plain anonymous memory), so it takes the tree down
        with it: tree_pid, the restored root, if it is still our child (its subreaper's
        supervisor then sees the engine die)."""

        def reap() -> None:
            code = self.proc.wait()
            took = time.monotonic() - self.started
            if code == 0:
                logger.info("criu lazy-pages copied every page in %.2f s", took)
                return
            why = _first_error(self.log, f"exit status {code}")
            if _kill_our_child(tree_pid):
                why += "; the restored engine it was filling was killed"
            logger.error("criu lazy-pages failed after %.2f s: %s", took, why)

        threading.Thread(target=reap, name="criu-lazy-pages", daemon=True).start()


def start_lazy_pages(criu: Criu, images: Path, workdir: Path, timeout: float = 10.0) -> LazyPages:
    """Start the `criu lazy-pages` daemon a `criu restore --lazy-pages` in workdir hands its
    userfaultfds to; returns once it listens. The daemon serves each fault from the page images
    (reads of the mount, which fetch and verify their chunks), then copies every remaining page
    in the background and exits: its life is bounded by the restored tree's (a tree that exits
    closes the userfaultfds). It runs in a process group of its own so that a Ctrl-C of
    fastboot does not take it away from a tree still being filled."""
    log = workdir / "lazy-pages.log"
    command = [criu.path, "lazy-pages", "--images-dir", str(images), "--work-dir", str(workdir)]
    command += ["--log-file", str(log), "-v4"]
    logger.debug("running %s", " ".join(command))
    started = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0
    )
    while not (workdir / LAZY_PAGES_SOCKET).exists():
        if proc.poll() is not None or time.monotonic() - started > timeout:
            kill_tree(proc)
            raise CriuError("lazy-pages", _first_error(log, "did not start"), log)
        time.sleep(0.002)
    return LazyPages(proc, log, started)


def kill_unadopted(workdir: Path) -> None:
    """Kill the tree a restore in workdir brought back, for when an exception (a Ctrl-C) came
    after criu finished but before the caller took the tree over: callers wrap restore-and-adopt
    in a try whose except calls this. Only a pid that is our child (we are its subreaper) is
    killed; it is pid 1 of the tree's pid namespace, so the kernel kills the rest."""
    try:
        pid = int((workdir / RESTORED_PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return
    if _kill_our_child(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _kill_our_child(pid: int) -> bool:
    """SIGKILL pid if it is our child (so not a recycled pid); whether it was. Not reaped."""
    fields = stat_fields(pid)
    if fields is None or int(fields[1]) != os.getpid():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True
