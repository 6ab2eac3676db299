"""The CUDA checkpoint around a CRIU dump and after a restore (nothing on CPU engines).

Order (docs/gpu.md): lock and checkpoint every CUDA process of the tree, then `criu dump`; after
`criu restore`, restore and unlock each of them, onto this host's GPUs where their UUIDs differ
from the dump's (the driver's UUID remap).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastboot.errors import FastbootError
from fastboot.gpu.checkpoint import CudaCheckpointer, cuda_pids
from fastboot.gpu.cycle import after_restore, dump_with_gpu, uuid_pairs
from fastboot.gpu.info import gpu_fields
from fastboot.host.proctree import tree_pids
from fastboot.host.supervisor import EngineTree
from fastboot.snapshot.store import Manifest

logger = logging.getLogger(__name__)


def with_gpu(tree: EngineTree, dump: Callable[[], None]) -> None:
    """dump(), with the tree's CUDA processes checkpointed around it (none on CPU engines)."""
    pids = cuda_pids(tree_pids(tree.root_pid))
    if not pids:
        dump()
        return
    dump_with_gpu(pids, dump, CudaCheckpointer())


def gpu_after_restore(tree: EngineTree, manifest: Manifest) -> None:
    """Restore and unlock the CUDA state of a restored tree's processes (none on CPU engines).
    On failure the tree is stopped and the error (GpuRestoreError) raised: boot cold."""
    if not (pids := cuda_pids(tree_pids(tree.root_pid))):
        return
    try:
        pairs = uuid_pairs(manifest.fingerprint.gpu_uuids, gpu_fields().get("gpu_uuids", ()))
        if pairs:
            logger.info("restoring onto other GPUs: %s", ", ".join(f"{a}->{b}" for a, b in pairs))
        after_restore(pids, CudaCheckpointer(), pairs)
    except FastbootError:
        tree.stop()
        raise
