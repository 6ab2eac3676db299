"""The must-show cases: a torch virtual environment and the tiny model's weights, served lazily
from images on a real nginx, read by real programs (the env's python, safetensors)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastboot.imagefs import metrics as fbmetrics
from fastboot.imagefs.build import build
from fastboot.imagefs.mount import MountOptions, mounted
from fastboot.imagefs.store import ImageStore, MountRecord
from fastboot.imagefs.sync import pull
from fastboot.imagefs.testing import Nginx, torch_venv

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="FUSE mounts with allow_other need root"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    base = tmp_path_factory.mktemp("imagefs-remote")
    os.chmod(base, 0o755)
    (base / "served").mkdir()
    server = Nginx(base / "served", base / "nginx")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def torch_image(tmp_path_factory: pytest.TempPathFactory, remote: Nginx) -> Path:
    """A venv with torch and what `import torch` loads, built and pushed to the remote."""
    base = tmp_path_factory.mktemp("torch-env")
    venv = torch_venv(base / "venv")
    origin = ImageStore(base / "origin")
    build(origin, venv, "torch-env", progress=False)
    origin.push("torch-env", remote.root)
    return venv


def run_timed(argv: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return time.monotonic() - started, out.stdout


def values(record: MountRecord) -> dict[str, float]:
    return fbmetrics.read_textfile(Path(record.metrics_file))


IMPORT = "import torch; print(torch.__version__, torch.ones(4).sum().item())"


def test_import_torch_from_a_lazy_image_fetches_under_10_percent(
    torch_image: Path, remote: Nginx, tmp_path: Path
) -> None:
    local_s = min(run_timed([str(torch_image / "bin" / "python"), "-c", IMPORT])[0] for _ in "ab")
    store = ImageStore(tmp_path / "host")
    pull(store, "torch-env", remote.url)
    point = tmp_path / "mnt"
    point.mkdir()
    python = str(point / "bin" / "python")

    with mounted("torch-env", point, store) as record:
        cold_s, out = run_timed([python, "-c", IMPORT])
        assert out.split()[1] == "4.0"
        warm_s = run_timed([python, "-c", IMPORT])[0]
    cold = values(record)
    image = cold["fastboot_imagefs_image_bytes"]
    fetched = cold['fastboot_imagefs_chunk_bytes_total{tier="remote"}']
    raw = cold["fastboot_imagefs_remote_raw_bytes_total"]

    shutil.rmtree(store.root / "cache")
    (store.root / "cache").mkdir(mode=0o700)
    with mounted("torch-env", point, store, MountOptions(prefetch_rate=0)) as record:
        prefetch_s = run_timed([python, "-c", IMPORT])[0]
    replayed = values(record)
    reads_key = 'fastboot_imagefs_ops_total{op="read"}'

    print(
        f"\nimport torch: local {local_s:.2f} s | image cold {cold_s:.2f} s, "
        f"with prefetch {prefetch_s:.2f} s, warm {warm_s:.2f} s\n"
        f"fetched {fetched / 1e6:.1f} MB over HTTP ({raw / 1e6:.1f} MB decompressed) of a "
        f"{image / 1e6:.1f} MB image = {fetched / image:.1%} ({raw / image:.1%} raw); "
        f"prefetch {replayed['fastboot_imagefs_prefetch_bytes_total'] / 1e6:.1f} MB, "
        f"{replayed['fastboot_imagefs_prefetch_used_bytes_total'] / 1e6:.1f} MB of it read"
    )
    assert fetched / image <= 0.10
    assert cold['fastboot_imagefs_corrupt_chunks_total{tier="remote"}'] == 0
    assert replayed["fastboot_imagefs_prefetch_bytes_total"] > 0.5 * raw
    # The replay put its chunks into the page cache: the import's reads mostly never reached
    # the daemon.
    assert replayed.get(reads_key, 0) < 0.5 * cold[reads_key]


def test_tiny_model_weights_from_a_lazy_image_are_byte_identical_and_load(
    tiny_model: Path, remote: Nginx, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    origin = ImageStore(tmp_path / "origin")
    build(origin, tiny_model, "tiny-weights", progress=False)
    origin.push("tiny-weights", remote.root)
    store = ImageStore(tmp_path / "host")
    pull(store, "tiny-weights", remote.url)
    point = tmp_path / "mnt"
    point.mkdir()
    with mounted("tiny-weights", point, store) as record:
        source = sorted(p.relative_to(tiny_model) for p in tiny_model.rglob("*") if p.is_file())
        assert source == sorted(p.relative_to(point) for p in point.rglob("*") if p.is_file())
        for rel in source:
            assert (point / rel).read_bytes() == (tiny_model / rel).read_bytes(), rel
        weights = sorted(point.glob("*.safetensors"))
        assert weights
        for path in weights:
            mine, theirs = load_file(str(path)), load_file(str(tiny_model / path.name))
            assert mine.keys() == theirs.keys()
            for key in mine:
                assert torch.equal(mine[key], theirs[key]), key
    got = values(record)
    assert got['fastboot_imagefs_chunk_hits_total{tier="remote"}'] > 0
