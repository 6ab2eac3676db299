"""vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in every process of the engine tree (API server, EngineCore, workers).
It proves it ran (fastboot checks the report), keeps the engine's torch.distributed file store
out of /tmp, makes vLLM read its own /proc entry in a pid namespace, and on CPU it shortens the
shared-memory readers' spin (each below).

Its own /proc entry: fastboot starts a (non-isolated) engine as pid 1 of a pid namespace of its
own but leaves it the host's /proc (a /proc of its own would need a mount namespace in every
snapshot). vLLM's CPU executor reads `/proc/{os.getpid()}/status` for its NUMA memory affinity:
inside the namespace that is a small number, naming some other process of the host, or none. In
a container (whose /proc is the container's) the engine then failed to start with
`FileNotFoundError: /proc/15/status`. `/proc/self` always names the reader, so the plugin reads
that.

The file store: every vLLM engine rendezvous through a FileStore file
`tempfile.gettempdir()/vllm_dist_<uuid>`, which torch deletes only when the store object is
destroyed, and an engine that is stopped, or dumped, never gets there: every boot left one in
/tmp. fastboot gives its engines a run directory of their own for their ZMQ sockets
(VLLM_RPC_BASE_PATH, emptied before each boot and removed at exit); the store goes there too.
It is only read while the engine initialises, so a restored engine never needs it again (a
restore starts from an emptied directory). Moving TMPDIR instead would move torch inductor's
compile cache with it.

The spin: vLLM's shared-memory message queue (`shm_broadcast.SpinCondition`) keeps each reader
— the worker waiting for the next step, the EngineCore waiting for the worker's output —
busy-looping on `sched_yield()` for `busy_loop_s` = 1 s after every message before it blocks on
a ZMQ socket. On a GPU host that buys microseconds per decode step on dedicated cores. On a CPU
host whose cores the replicas share, it means every replica burns a core for a second after
each request: measured with four restored replicas of the tiny model on 2 vCPUs, half of all
CPU samples during the restores were workers spinning, and the four were ready after 1.4-1.7 s
instead of 0.5-0.6 s with a 20 ms spin. Under load the gap between steps is far below 20 ms, so
the queue still spins while busy; an idle reader pays one ZMQ wake-up (tens of microseconds)
for its next message, on an engine whose CPU steps take milliseconds.

The CPU report: on CPU every worker gets a method `fastboot_cpu_report` (cpu_report.report():
which instructions torch, oneDNN, numpy, glibc and vLLM's kernels chose), so a restored engine
can be asked, with vLLM's own `POST /collective_rpc {"method": "fastboot_cpu_report"}` (served
when VLLM_SERVER_DEV_MODE=1), what its code runs on: how tests/integration/test_cpu_baseline.py
shows a `--fastboot-cpu-baseline` holds.
"""

from __future__ import annotations

import functools
import os
import sys
import uuid
from typing import Any

from . import cpu_report
from .report import launched_by_fastboot, report_loaded

#: How long a shared-memory reader spins after a message on CPU engines (vLLM: 1 s).
CPU_READER_SPIN_S = 0.02


def register() -> None:
    if not launched_by_fastboot():
        return
    report_loaded("vllm")
    if run_dir := os.environ.get("VLLM_RPC_BASE_PATH"):
        keep_file_store_in(run_dir)
    if _on_cpu():  # only vLLM's CPU executor looks itself up in /proc, and only it spins idly
        read_own_proc_status()
        limit_reader_spin(CPU_READER_SPIN_S)
        add_cpu_report()


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def limit_reader_spin(seconds: float) -> bool:
    """Make new SpinConditions default to spinning `seconds`; idempotent. False when this vLLM
    has no SpinCondition (nothing to change)."""
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return False
    spin = getattr(shm_broadcast, "SpinCondition", None)
    if spin is None:
        return False
    if getattr(spin.__init__, "_fastboot_spin_s", None) is not None:
        return True
    original = spin.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) < 4:  # (is_reader, context, notify_address[, busy_loop_s])
            kwargs.setdefault("busy_loop_s", seconds)
        original(self, *args, **kwargs)

    __init__._fastboot_spin_s = seconds  # type: ignore[attr-defined]
    spin.__init__ = __init__
    return True


#: vLLM modules that bind get_file_store_init_method by name when imported.
FILE_STORE_USERS = ("vllm.v1.executor.multiproc_executor", "vllm.v1.executor.uniproc_executor")


def keep_file_store_in(directory: str) -> bool:
    """Make vLLM's file-store rendezvous file live in directory; idempotent. False when this
    vLLM has no get_file_store_init_method (nothing to change)."""
    try:
        from vllm.utils import network_utils
    except ImportError:
        return False
    original = getattr(network_utils, "get_file_store_init_method", None)
    if original is None:
        return False
    if getattr(original, "_fastboot_dir", None) is not None:
        return True

    def get_file_store_init_method() -> str:
        return f"file://{directory}/vllm_dist_{uuid.uuid4().hex}"

    get_file_store_init_method._fastboot_dir = directory  # type: ignore[attr-defined]
    network_utils.get_file_store_init_method = get_file_store_init_method
    # Modules imported before this plugin ran hold the original by name; later ones import ours.
    for name in FILE_STORE_USERS:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "get_file_store_init_method"):
            module.get_file_store_init_method = get_file_store_init_method  # type: ignore[attr-defined]
    return True


#: The worker method that answers cpu_report.report() (vLLM's collective_rpc calls it by name).
CPU_REPORT_METHOD = "fastboot_cpu_report"


def add_cpu_report() -> bool:
    """Give vLLM's workers the method CPU_REPORT_METHOD; idempotent. False in a process without
    workers: every process with one has imported worker_base before plugins load (the
    executors import it; it loads plugins itself), so the API server is spared its import."""
    worker_base = sys.modules.get("vllm.v1.worker.worker_base")
    if worker_base is None or not hasattr(worker_base, "WorkerWrapperBase"):
        return False
    WorkerWrapperBase = worker_base.WorkerWrapperBase
    if not hasattr(WorkerWrapperBase, CPU_REPORT_METHOD):

        def fastboot_cpu_report(self: Any) -> dict[str, Any]:
            return cpu_report.report()

        setattr(WorkerWrapperBase, CPU_REPORT_METHOD, fastboot_cpu_report)
    return True


def read_own_proc_status() -> bool:
    """Make vLLM's get_memory_affinity() of this process read /proc/self/status; idempotent.
    False when this vLLM has no such function (nothing to change)."""
    try:
        from vllm.utils import cpu_resource_utils
    except ImportError:
        return False
    original = getattr(cpu_resource_utils, "get_memory_affinity", None)
    if original is None:
        return False
    if getattr(original, "_fastboot_self", False):
        return True

    @functools.wraps(original)
    def get_memory_affinity(pid: int = 0) -> list[int]:
        if pid not in (0, os.getpid()):
            return list(original(pid))
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Mems_allowed_list:"):
                    return list(cpu_resource_utils.parse_id_list(line.split(":", 1)[1].strip()))
        return []

    get_memory_affinity._fastboot_self = True  # type: ignore[attr-defined]
    cpu_resource_utils.get_memory_affinity = get_memory_affinity
    return True
