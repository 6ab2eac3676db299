"""GPU fields of the host fingerprint: NVML reading (fake NVML), old manifests, compatibility."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from fastboot.gpu.info import gpu_fields
from fastboot.snapshot import fingerprint
from fastboot.snapshot.fingerprint import Fingerprint


class FakeNvml:
    def __init__(self, names: list[str], init_error: bool = False) -> None:
        self.names = names
        self.init_error = init_error
        self.shut = False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.names[h].encode()

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=143771 * (1 << 20))

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-0000000{h}-aaaa-bbbb-cccc-dddddddddddd"

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65.06"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000


def test_gpu_fields_from_nvml() -> None:
    nvml = FakeNvml(["NVIDIA H200", "NVIDIA H200"])
    fields = gpu_fields(nvml)
    assert fields == {
        "gpu_model": "NVIDIA H200",
        "gpu_count": 2,
        "gpu_memory_mib": 143771,
        "gpu_driver": "580.65.06",
        "gpu_cuda": "13.0",
        "gpu_uuids": [
            "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
            "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd",
        ],
    }
    assert nvml.shut


def test_gpu_fields_empty_without_driver_or_gpu() -> None:
    assert gpu_fields(FakeNvml(["x"], init_error=True)) == {}
    assert gpu_fields(FakeNvml([])) == {}
    assert gpu_fields() == {}  # this host: nvidia-ml-py installed, no driver


def test_mixed_models_never_match_a_uniform_host() -> None:
    assert gpu_fields(FakeNvml(["NVIDIA A100", "NVIDIA H100"]))["gpu_model"] == (
        "NVIDIA A100 + NVIDIA H100"
    )


def _fp(**gpu: Any) -> Fingerprint:
    return replace(fingerprint.current("vllm 0.32.0"), **gpu)


H200 = {"gpu_model": "NVIDIA H200", "gpu_count": 1, "gpu_driver": "580.65.06", "gpu_cuda": "13.0"}


def test_old_manifest_without_gpu_fields_loads_and_round_trips() -> None:
    old = fingerprint.current("vllm 0.32.0").to_json()
    for key in [k for k in old if k.startswith("gpu_")]:
        del old[key]
    loaded = Fingerprint.from_json(old)
    assert loaded.gpu_count == 0 and loaded.gpu_uuids == ()
    new = _fp(**H200, gpu_uuids=("GPU-1",))
    assert Fingerprint.from_json(new.to_json()) == new
    assert Fingerprint.from_json({**new.to_json(), "from_the_future": 1}) == new


def test_current_without_gpu_flag_has_no_gpu_fields() -> None:
    fp = fingerprint.current("vllm 0.32.0")
    assert (fp.gpu_count, fp.gpu_model) == (0, "")
    assert fingerprint.current("vllm 0.32.0", gpu=True).gpu_count == 0  # no driver here


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ({**H200, "gpu_driver": "580.95.05"}, None),  # same driver major
        ({**H200, "gpu_cuda": "13.1"}, None),
        ({**H200, "gpu_count": 2}, "GPU count differs: snapshot 1, host 2"),
        ({}, "GPU count differs: snapshot 1, host 0"),
        ({**H200, "gpu_model": "NVIDIA H100 80GB HBM3"}, "GPU model differs"),
        ({**H200, "gpu_driver": "575.51.03"}, "NVIDIA driver major differs"),
    ],
)
def test_gpu_incompatibility(host: dict[str, Any], reason: str | None) -> None:
    why = fingerprint.incompatibility(_fp(**H200), _fp(**host))
    if reason is None:
        assert why is None
    else:
        assert why is not None and why.startswith(reason)


def test_cpu_snapshot_restores_on_a_gpu_host() -> None:
    assert fingerprint.incompatibility(_fp(), _fp(**H200)) is None
