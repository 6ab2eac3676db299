"""What this host can do for fastboot, one check per capability.

Each check returns a `Check`: pass/fail, what was found, and the fix. A mode names what the user
wants to run; `required_failures()` is what makes `fastboot doctor` exit non-zero for it:

    cpu      snapshot/restore of CPU engines: kernel, CRIU, io_uring handling, namespaces,
             netfilter tools (CRIU restores network namespaces with iptables-restore), the engine
    gpu      cpu + an NVIDIA driver and the CUDA checkpoint driver API
    imagefs  the lazy image filesystem: /dev/fuse, fusermount3, pyfuse3
    all      all of the above

Checks never raise: a broken probe is a failed check that says why.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastboot import engines, envs
from fastboot.errors import FastbootError
from fastboot.host import iouring
from fastboot.snapshot import cpu_levels, fingerprint
from fastboot.snapshot import criu as criu_mod
from fastboot.snapshot.store import Manifest, SnapshotInvalid, Store

MODES = ("auto", "cpu", "gpu", "imagefs", "all")


@dataclass(frozen=True)
class Check:
    """The outcome of one capability check."""

    name: str
    """Short capability name ("criu", "fuse", ...)."""
    ok: bool
    """Whether the capability is usable."""
    detail: str
    """What was found (versions, paths, settings)."""
    fix: str = ""
    """What to do when not ok."""
    needed_by: tuple[str, ...] = ()
    """Modes that cannot work without it."""
    items: tuple[str, ...] = ()
    """One line per thing found (each snapshot in the store), printed under the check."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _dist_version(*names: str) -> tuple[str, str] | None:
    for name in names:
        try:
            return name, md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Kernel, CRIU, io_uring, namespaces, netfilter, cgroups


def check_kernel() -> Check:
    release = platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return Check(
            "kernel", False, f"cannot parse kernel release {release!r}", needed_by=("cpu",)
        )
    # userfaultfd for lazy restore and the CRIU features fastboot uses are all in 5.x kernels.
    ok = (major, minor) >= (5, 10)
    return Check(
        "kernel",
        ok,
        f"Linux {release} ({platform.machine()})",
        "" if ok else "use a Linux kernel >= 5.10",
        ("cpu", "gpu"),
    )


def check_criu() -> Check:
    needed = ("cpu", "gpu")
    try:
        found = criu_mod.find_criu()
    except FastbootError as exc:
        return Check("criu", False, str(exc), criu_mod.INSTALL_HINT, needed)
    try:
        output = found.check()
    except FastbootError as exc:
        detail = f"{found.version_text} at {found.path}; {exc}"
        fix = "see `criu check --all` for the missing kernel feature"
        return Check("criu", False, detail, fix, needed)
    verdict = "Looks good." if "Looks good" in output else output.splitlines()[-1]
    detail = f"{found.version_text} at {found.path}; criu check: {verdict}"
    return Check("criu", True, f"{detail}; {page_mapping(found)}", "", needed)


def page_mapping(found: criu_mod.Criu) -> str:
    """How restores fill memory: mapped page images (fastboot's CRIU patch) or copies."""
    if not found.maps_pages:
        amx = (
            "; on this AMX CPU, engines whose kernels used AMX die at their first request "
            "after a restore (falling back to cold boots)"
            if _has_amx()
            else ""
        )
        return f"restores copy pages{amx} (no fastboot patch; `fastboot install-criu` builds it)"
    if envs.copy_pages():
        return "restores copy pages (FASTBOOT_COPY_PAGES is set)"
    return "restores map page images copy-on-write (fastboot patch)"


def _has_amx() -> bool:
    """Whether the CPU has AMX tiles (then restores need the patch's AMX permission)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_tile" in f.read()
    except OSError:
        return False


def check_io_uring() -> Check:
    """Names the host setting and proves the per-process blocker works in a child."""
    value = iouring.sysctl_value()
    setting = {0: "enabled host-wide", 1: "root only", 2: "disabled host-wide"}
    named = f"kernel.io_uring_disabled={value} ({setting.get(value or 0, '?')})"
    if value is None:
        named = "kernel.io_uring_disabled absent (io_uring enabled unless the kernel lacks it)"
    probe = "from fastboot.host.iouring import io_uring_setup_errno as e; print(e())"
    try:
        result = _run(iouring.wrap([sys.executable, "-c", probe]))
        blocked = result.returncode == 0 and result.stdout.strip() not in ("", "0")
        why = result.stderr.strip().splitlines()[-1:] if result.returncode else []
    except (OSError, subprocess.TimeoutExpired) as exc:
        blocked, why = False, [str(exc)]
    if blocked:
        detail = f"{named}; fastboot blocks io_uring per engine process (seccomp), verified"
        return Check("io_uring", True, detail, "", ("cpu", "gpu"))
    if value == 2:
        return Check("io_uring", True, f"{named}; CRIU can dump every process", "", ("cpu", "gpu"))
    detail = f"{named}; the per-process seccomp blocker failed: {' '.join(why) or 'unknown'}"
    fix = "run as root (CAP_SYS_ADMIN) or `sysctl kernel.io_uring_disabled=2`"
    return Check("io_uring", False, detail, fix, ("cpu", "gpu"))


def check_namespaces() -> Check:
    unshare = shutil.which("unshare")
    if unshare is None:
        return Check(
            "namespaces", False, "unshare not found", "apt-get install util-linux", ("cpu", "gpu")
        )
    kinds = ["--pid", "--net", "--mount", "--ipc", "--uts"]
    try:
        result = _run([unshare, *kinds, "--fork", "true"])
        ok, why = result.returncode == 0, result.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, why = False, str(exc)
    if ok:
        return Check(
            "namespaces", True, "pid, net, mount, ipc, uts: can create", "", ("cpu", "gpu")
        )
    fix = "run as root or with CAP_SYS_ADMIN (user namespaces alone cannot restore with CRIU)"
    return Check("namespaces", False, f"unshare failed: {why}", fix, ("cpu", "gpu"))


def check_netfilter() -> Check:
    tools = {name: shutil.which(name) for name in ("iptables-restore", "nft")}
    missing = [name for name, path in tools.items() if path is None]
    found = ", ".join(f"{name} at {path}" for name, path in tools.items() if path)
    if not missing:
        return Check("netfilter", True, found, "", ("cpu", "gpu"))
    fix = "apt-get install iptables nftables (CRIU locks and restores network namespaces with them)"
    return Check("netfilter", False, f"missing {', '.join(missing)}", fix, ("cpu", "gpu"))


def check_cgroups() -> Check:
    root = Path("/sys/fs/cgroup")
    controllers = root / "cgroup.controllers"
    if controllers.exists():
        names = controllers.read_text().split()
        have = [c for c in ("memory", "cpu", "pids") if c in names]
        ok = len(have) == 3 and os.access(root, os.W_OK)
        detail = f"cgroup v2 with {', '.join(names) or 'no controllers'}"
    else:
        have = [c for c in ("memory", "cpu", "pids") if (root / c / "tasks").exists()]
        ok = len(have) == 3 and os.access(root / "memory", os.W_OK)
        detail = f"cgroup v1 hierarchies: {', '.join(have) or 'none'}"
    fix = (
        "" if ok else "mount cgroup2 (or v1 memory/cpu/pids) writable to enforce per-replica limits"
    )
    # Limits are optional: replicas run without them, so no mode requires this.
    return Check("cgroups", ok, detail + ("" if ok else " (per-replica limits unavailable)"), fix)


# ---------------------------------------------------------------------------------------------
# FUSE


def check_fuse() -> Check:
    needed = ("imagefs",)
    problems = []
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        problems.append(f"/dev/fuse: {exc.strerror}")
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        problems.append("fusermount3 not found")
    pyfuse3 = _dist_version("pyfuse3")
    if pyfuse3 is None:
        problems.append("pyfuse3 not installed")
    if problems:
        fix = "apt-get install fuse3 libfuse3-dev pkg-config, then pip install 'fastboot[imagefs]'"
        return Check("fuse", False, "; ".join(problems), fix, needed)
    detail = f"/dev/fuse usable, {fusermount}, pyfuse3 {pyfuse3[1] if pyfuse3 else ''}"
    try:
        import pyfuse3 as pyfuse3_module

        from fastboot.imagefs.passthrough import supported  # pyfuse3 + trio: may be missing

        through = supported()
        nogil = bool(getattr(pyfuse3_module, "READ_REPLY_RELEASES_GIL", False))
    except ImportError:  # trio missing: the fuse line's other checks say what to install
        through = nogil = False
    if through:
        detail += ", passthrough (warm reads of whole files at local-disk speed)"
        if nogil:
            detail += ", read replies without the GIL (cold reads overlap fetches)"
    else:
        detail += (
            "; no passthrough: the daemon serves every read (bash "
            "fastboot/imagefs/provision-fuse.sh .venv/bin/python builds it)"
        )
    return Check("fuse", True, detail, "", needed)


# ---------------------------------------------------------------------------------------------
# Engines


def check_engine(engine: engines.Engine, required: bool) -> Check:
    ok, detail, fix = engine.doctor()
    return Check(engine.NAME, ok, detail, fix, ("cpu", "gpu") if required else ())


# ---------------------------------------------------------------------------------------------
# GPU


def check_gpu() -> Check:
    needed = ("gpu",)
    if importlib.util.find_spec("pynvml") is None:
        return Check(
            "gpu", False, "nvidia-ml-py not installed", "pip install 'fastboot[gpu]'", needed
        )
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Check(
            "gpu", False, f"no NVIDIA driver (NVML: {exc})", "install an NVIDIA driver", needed
        )
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        names = [
            pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    finally:
        pynvml.nvmlShutdown()
    driver = driver.decode() if isinstance(driver, bytes) else str(driver)
    if not names:
        return Check(
            "gpu", False, f"driver {driver}, no GPU visible", "check CUDA_VISIBLE_DEVICES", needed
        )
    major = int(driver.split(".")[0])
    detail = f"driver {driver}, {len(names)} GPU(s): {', '.join(map(str, names))}"
    if major < 570:
        return Check(
            "gpu",
            False,
            detail,
            "the CUDA checkpoint API needs driver >= 570 (580 for all of it)",
            needed,
        )
    return Check("gpu", True, detail, "", needed)


def check_cuda_checkpoint() -> Check:
    needed = ("gpu",)
    if (
        importlib.util.find_spec("cuda") is None
        or importlib.util.find_spec("cuda.bindings") is None
    ):
        fix = "pip install 'fastboot[gpu]'"
        return Check("cuda-checkpoint", False, "cuda-bindings not installed", fix, needed)
    from cuda.bindings import driver

    wanted = (
        "cuCheckpointProcessLock",
        "cuCheckpointProcessCheckpoint",
        "cuCheckpointProcessRestore",
        "cuCheckpointProcessUnlock",
        "cuCheckpointProcessGetState",
    )
    missing = [name for name in wanted if not hasattr(driver, name)]
    if missing:
        return Check(
            "cuda-checkpoint",
            False,
            f"cuda-bindings lacks {', '.join(missing)}",
            "pip install -U 'cuda-bindings>=12.9'",
            needed,
        )
    try:
        (err,) = driver.cuInit(0)
    except Exception as exc:  # the binding raises when libcuda.so is absent
        return Check(
            "cuda-checkpoint",
            False,
            f"libcuda not loadable: {exc}",
            "install an NVIDIA driver",
            needed,
        )
    if err != driver.CUresult.CUDA_SUCCESS:
        return Check(
            "cuda-checkpoint",
            False,
            f"cuInit: {err.name}",
            "install an NVIDIA driver >= 570",
            needed,
        )
    return Check(
        "cuda-checkpoint", True, "cuCheckpointProcess* present in the driver API", "", needed
    )


def check_cpu_level() -> Check:
    """This CPU's x86-64 level: the highest a snapshot made elsewhere may be held to and
    still restore here (informational)."""
    model, flags = fingerprint.cpu_info()
    level = cpu_levels.highest_level(flags)
    if level is None:
        return Check("cpu level", True, f"{platform.machine()} ({model}): no x86-64 level")
    detail = f"{level} ({model})"
    if level != "x86-64-v4":
        detail += f"; lacks {', '.join(cpu_levels.missing('x86-64-v4', flags)[:6])} of v4"
    return Check("cpu level", True, detail)


def check_snapshots(root: Path | None = None) -> Check:
    """Which snapshots in the store restore on this host, and why the others do not (the
    same verdict the boot sequence reaches, without verifying every file): one line each, with
    the CPU baseline it was made at."""
    root = root or envs.snapshot_dir()
    found = Store(root).list()
    if not found:
        return Check("snapshots", True, f"none in {root}")
    lines = [snapshot_verdict(manifest) for manifest in found]
    fits = sum(1 for ok, _ in lines if ok)
    detail = f"{fits} of {len(found)} in {root} restore here"
    return Check("snapshots", True, detail, items=tuple(line for _, line in lines))


def snapshot_verdict(manifest: Manifest | SnapshotInvalid) -> tuple[bool, str]:
    """(restores here, "ID MODEL baseline LEVEL: restores here" or ": REASON")."""
    if not isinstance(manifest, Manifest):
        return False, f"invalid: {manifest}"
    baseline = manifest.key.get("cpu_baseline", cpu_levels.NATIVE)
    name = f"{manifest.id[:12]} {manifest.model_name or '?'} baseline {baseline}"
    try:
        engine = engines.get(
            str(manifest.key.get("engine", engines.DEFAULT)), manifest.key.get("engine_options")
        )
        host = _host_fingerprint(f"{engine.NAME} {engine.version()}")
    except FastbootError as exc:
        return False, f"{name}: {exc}"
    if why := fingerprint.incompatibility(manifest.fingerprint, host):
        return False, f"{name}: {why}"
    return True, f"{name}: restores here"


@functools.cache
def _host_fingerprint(engine: str) -> fingerprint.Fingerprint:
    return fingerprint.current(engine, gpu=True)


# ---------------------------------------------------------------------------------------------


def run_checks(engine: str = engines.DEFAULT) -> list[Check]:
    """Every check, in display order."""
    checks: list[Callable[[], Check]] = [
        check_kernel,
        check_criu,
        check_io_uring,
        check_namespaces,
        check_netfilter,
        check_cgroups,
        check_fuse,
        *(functools.partial(check_engine, e, engine == e.NAME) for e in engines.ADAPTERS.values()),
        check_gpu,
        check_cuda_checkpoint,
        check_cpu_level,
        check_snapshots,
    ]
    return [check() for check in checks]


def resolve_mode(mode: str, checks: Iterable[Check]) -> str:
    """`auto` becomes `gpu` where a GPU answered, else `cpu`."""
    if mode != "auto":
        return mode
    gpu = next((c for c in checks if c.name == "gpu"), None)
    return "gpu" if gpu is not None and gpu.ok else "cpu"


def required_failures(checks: Iterable[Check], mode: str) -> list[Check]:
    """Failed checks that `mode` cannot do without (mode "all" needs every mode's)."""
    if mode == "all":
        return [c for c in checks if not c.ok and c.needed_by]
    wanted = {"gpu": {"cpu", "gpu"}}.get(mode, {mode})
    return [c for c in checks if not c.ok and wanted & set(c.needed_by)]
