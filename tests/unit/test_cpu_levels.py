"""x86-64 levels from CPU flags, what a level-held snapshot is accepted on, and the doctor's
view of a store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fastboot import doctor, engines
from fastboot.snapshot import cpu_levels, fingerprint
from fastboot.snapshot.store import Manifest, SnapshotId, Store

#: Flags a CPU reports beyond the levels (they never decide one).
EXTRA = ("aes", "rdrand", "sha_ni", "hypervisor")


def host(level: str, drop: str = "") -> fingerprint.Fingerprint:
    flags = tuple(sorted((cpu_levels.LEVELS[level] | set(EXTRA)) - {drop}))
    return dataclasses.replace(fingerprint.current("vllm test"), cpu_flags=flags)


@pytest.mark.parametrize("level", ["x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4"])
def test_the_highest_level_of_each_flag_set(level: str) -> None:
    assert cpu_levels.highest_level(host(level).cpu_flags) == level


def test_one_missing_feature_drops_a_level() -> None:
    assert cpu_levels.highest_level(host("x86-64-v3", drop="movbe").cpu_flags) == "x86-64-v2"
    assert cpu_levels.missing("x86-64-v3", host("x86-64-v3", drop="movbe").cpu_flags) == ["movbe"]
    assert cpu_levels.highest_level(["neon", "asimd"]) is None  # not x86


def test_a_snapshot_held_to_v2_fits_v2_v3_v4_hosts_and_no_host_missing_a_v2_feature() -> None:
    snapshot = dataclasses.replace(host("x86-64-v4"), cpu_flags=tuple(sorted(cpu_levels.X86_64_V2)))
    for level in ("x86-64-v2", "x86-64-v3", "x86-64-v4"):
        assert fingerprint.incompatibility(snapshot, host(level)) is None
    why = fingerprint.incompatibility(snapshot, host("x86-64-v4", drop="sse4_2"))
    assert why is not None and "sse4_2" in why


def test_the_doctor_says_which_snapshots_restore_here(tmp_path: Path) -> None:
    store = Store(tmp_path)
    here = fingerprint.current(f"vllm {engines.get('vllm').version()}", gpu=True)
    v2 = tuple(sorted(cpu_levels.X86_64_V2))
    for snapshot_id, fp, baseline in (
        ("fitsfitsfits", here, None),
        ("newkernelnewk", dataclasses.replace(here, kernel="99.1.0-future"), None),
        ("v2v2v2v2v2v2", dataclasses.replace(here, cpu_flags=v2), "x86-64-v2"),
        ("armarmarmarm", dataclasses.replace(here, machine="aarch64"), None),
    ):
        with store.partial(SnapshotId(snapshot_id)) as partial:
            (partial / "pages-1.img").write_bytes(b"pages")
            store.publish(partial, _manifest(snapshot_id, fp, baseline))
    check = doctor.check_snapshots(tmp_path)
    assert check.ok
    assert check.detail == f"2 of 4 in {tmp_path} restore here"
    lines = {line.split()[0]: line for line in check.items}
    assert lines["fitsfitsfits"] == "fitsfitsfits tiny baseline native: restores here"
    assert lines["v2v2v2v2v2v2"] == "v2v2v2v2v2v2 tiny baseline x86-64-v2: restores here"
    assert "kernel" in lines["newkernelnew"] and "restores here" not in lines["newkernelnew"]
    assert "aarch64" in lines["armarmarmarm"]
    assert doctor.check_snapshots(tmp_path / "none").detail.startswith("none in")


def test_the_doctor_names_this_cpus_level() -> None:
    check = doctor.check_cpu_level()
    _, flags = fingerprint.cpu_info()
    level = cpu_levels.highest_level(flags)
    assert check.ok and (level is None or check.detail.startswith(level))


def _manifest(snapshot_id: str, fp: fingerprint.Fingerprint, baseline: str | None) -> Manifest:
    key = {"engine": "vllm", "engine_version": "0", "model": {}}
    if baseline:
        key["cpu_baseline"] = baseline
    return Manifest(
        id=SnapshotId(snapshot_id),
        key=key,
        model_name="tiny",
        fingerprint=fp,
        oracle={"token_ids": [1]},
        created=1.0,
        cold_boot_s=1.0,
        dump_s=1.0,
        engine_argv=[],
        stdio_pipe="pipe:[1]",
    )


@pytest.mark.parametrize(
    ("snapshot", "host", "fits"),
    [
        ("6.18.44-fc-v1272", "6.18.44-fc-v1272", True),  # the same build
        ("6.18.44-fc-v1272", "6.18.50-other", True),  # another build of the same version
        ("6.1.0-18-amd64", "6.18.44-fc-v1272", True),  # a newer kernel keeps the interfaces
        ("6.18.44", "6.1.0-18-amd64", False),  # an older one may lack what the code uses
        ("6.18.44", "7.0.1", True),
        ("weird", "6.18.44", False),  # not a version: only the same string fits
        ("weird", "weird", True),
    ],
)
def test_kernels_that_do_and_do_not_matter(snapshot: str, host: str, fits: bool) -> None:
    assert (fingerprint.kernel_incompatibility(snapshot, host) is None) is fits


def test_the_ceiling_environment_and_flags() -> None:
    env = cpu_levels.baseline_env("x86-64-v3")
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["GLIBC_TUNABLES"].startswith("glibc.cpu.hwcaps=-AVX512F")
    assert "AVX512_SKX" in env["NPY_DISABLE_CPU_FEATURES"].split()
    assert cpu_levels.baseline_env("native") == {}
    flags = cpu_levels.ceiling_flags("x86-64-v3", host("x86-64-v4").cpu_flags)
    assert set(flags) == cpu_levels.X86_64_V3 | {"aes", "rdrand"}  # the unmasked ones it had
    with pytest.raises(ValueError, match="below x86-64-v4: it lacks avx512bw"):
        cpu_levels.ceiling_flags("x86-64-v4", host("x86-64-v4", drop="avx512bw").cpu_flags)
