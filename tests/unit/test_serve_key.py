"""The snapshot key and the port check of `fastboot serve`."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from fastboot.errors import UsageError
from fastboot.serve import ServeConfig, check_port_free, snapshot_key


def key_id(model: Path, argv: list[str], version: str = "0.32.0+cpu") -> str:
    return snapshot_key(ServeConfig(model=str(model), engine_argv=argv), version)[0]


def test_key_follows_flags_engine_version_and_model_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    model = tmp_path / "m"
    model.mkdir()
    (model / "w.safetensors").write_bytes(b"weights")
    base = key_id(model, ["--port", "8000"])
    assert base == key_id(model, ["--port", "8000"])  # stable
    assert base != key_id(model, ["--port", "8001"])
    assert base != key_id(model, ["--port", "8000"], version="0.33.0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert base != key_id(model, ["--port", "8000"])
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    (model / "w.safetensors").write_bytes(b"weightz")  # same size, other content
    assert base != key_id(model, ["--port", "8000"])


def test_hub_names_key_by_name() -> None:
    config = ServeConfig(model="org/name", engine_argv=[])
    assert snapshot_key(config, "1")[1]["model"] == {"name": "org/name"}


def test_busy_port_is_a_usage_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is busy"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again


def test_weights_image_gives_the_engine_the_mountpoint_and_keeps_the_served_name() -> None:
    from fastboot.serve import _from_image

    config = ServeConfig(model="tiny", engine_argv=["--port", "8000"])
    identity = {"path": "/m/abc", "image_index": "abc"}
    engine = _from_image(config, Path("/m/abc"), identity)
    assert engine.model == "/m/abc" and engine.model_identity == identity
    assert engine.engine_argv == ["--port", "8000", "--served-model-name", "tiny"]
    named = ServeConfig(model="tiny", engine_argv=["--served_model_name=x"])
    assert _from_image(named, Path("/m/abc"), identity).engine_argv == ["--served_model_name=x"]
    with pytest.raises(UsageError, match="give MODEL first"):
        _from_image(ServeConfig(model="t", engine_argv=["--model", "x"]), Path("/m"), identity)


def test_isolated_serve_strips_only_the_listen_flags() -> None:
    from fastboot.serve.isolated import strip_listen_flags

    argv = ["--host", "127.0.0.1", "--port=9000", "--max-model-len", "512", "--port", "1"]
    assert strip_listen_flags(argv) == ["--max-model-len", "512"]
    assert strip_listen_flags(["--hostname-like", "x"]) == ["--hostname-like", "x"]


def test_env_image_runs_the_engine_by_the_images_interpreter(tmp_path: Path) -> None:
    from fastboot.engines import vllm
    from fastboot.serve import _env_from_image, _site_packages

    config = ServeConfig(model="m", engine_argv=["--port", "8000"], env_image="env")
    identity = {"path": str(tmp_path), "image_index": "abc"}
    with pytest.raises(UsageError, match="'env' is not a virtual environment"):
        _env_from_image(config, tmp_path, identity)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (tmp_path / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    engine = _env_from_image(config, tmp_path, identity)
    assert engine.engine_python == tmp_path / "bin" / "python"
    assert vllm.command("m", ["--port", "8000"], engine.engine_python) == [
        str(tmp_path / "bin" / "python"), "-m", "vllm.entrypoints.cli.main", "serve", "m",
        "--port", "8000",
    ]  # fmt: skip
    assert _site_packages(engine.engine_python) == [f"{tmp_path}/lib/python3.11/site-packages"]
    # The key names the image only when there is one: other snapshots keep their ids.
    plain = snapshot_key(config, "1")
    assert "environment" not in plain[1]
    keyed = snapshot_key(engine, "1")
    assert keyed[1]["environment"] == identity and keyed[0] != plain[0]


def test_isolated_serve_refuses_images_for_now() -> None:
    from fastboot.serve import serve

    for config in (
        ServeConfig(model="m", engine_argv=[], isolated=True, env_image="x"),
        ServeConfig(model="m", engine_argv=[], isolated=True, weights_image="x"),
    ):
        with pytest.raises(UsageError, match="does not take --fastboot-"):
            serve(config)


def test_vllm_version_of_another_environment(tmp_path: Path) -> None:
    from fastboot.engines import vllm
    from fastboot.errors import DependencyError

    dist = tmp_path / "vllm-9.9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n")
    assert vllm.version([str(tmp_path)]) == "9.9.9"
    with pytest.raises(DependencyError, match="not installed in"):
        vllm.version([str(tmp_path / "empty")])
