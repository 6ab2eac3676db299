"""`fastboot doctor` on this machine: the capabilities the product needs are really there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastboot.snapshot.criu import find_criu

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU, namespaces and FUSE mounts need root"),
]


@pytest.fixture(scope="module")
def report() -> dict[str, dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "fastboot", "doctor", "--json", "--mode", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    document = json.loads(out.stdout)
    assert out.returncode == (0 if document["ok"] else 1)
    return {c["name"]: c for c in document["checks"]}


def test_criu_is_new_enough_and_its_check_passes(report: dict[str, dict[str, object]]) -> None:
    criu = report["criu"]
    assert criu["ok"], criu
    version = str(criu["detail"]).split()[0]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (4, 2)
    assert "criu check: Looks good." in str(criu["detail"])
    # It says how restores fill memory, matching the CRIU fastboot will use.
    mapped = "restores map page images copy-on-write" in str(criu["detail"])
    assert mapped == find_criu().maps_pages, criu["detail"]


def test_fuse_is_usable(report: dict[str, dict[str, object]]) -> None:
    assert report["fuse"]["ok"], report["fuse"]
    assert "/dev/fuse usable" in str(report["fuse"]["detail"])


def test_io_uring_setting_is_named(report: dict[str, dict[str, object]]) -> None:
    io_uring = report["io_uring"]
    assert io_uring["ok"], io_uring
    with open("/proc/sys/kernel/io_uring_disabled") as f:
        value = f.read().strip()
    assert f"kernel.io_uring_disabled={value}" in str(io_uring["detail"])


def test_cpu_mode_is_ready_here(report: dict[str, dict[str, object]]) -> None:
    for name in ("kernel", "criu", "io_uring", "namespaces", "netfilter", "vllm"):
        assert report[name]["ok"], report[name]


def test_gpu_mode_fails_without_a_gpu_and_names_the_fix() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastboot", "doctor", "--mode", "gpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    has_gpu = os.path.exists("/dev/nvidia0")
    assert out.returncode == (0 if has_gpu else 1)
    if not has_gpu:
        gpu_line = next(line for line in out.stdout.splitlines() if line.split()[1] == "gpu")
        assert gpu_line.startswith("FAIL") and "fix:" in gpu_line
