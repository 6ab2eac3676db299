"""The GPU path: CUDA checkpoint/restore around CRIU, and the GPU part of the host fingerprint.

    checkpoint.py   CudaCheckpointer over the driver's cuCheckpointProcess* API; cuda_pids()
    cycle.py        the order of the CUDA steps around `criu dump` and `criu restore`
    info.py         GPU model, count, memory, driver and CUDA versions from NVML

Nothing here imports cuda-bindings or pynvml at import time (`pip install 'fastboot[gpu]'`).
See docs/gpu.md.
"""
