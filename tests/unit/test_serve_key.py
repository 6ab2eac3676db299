"""The snapshot key and the port check of `fastboot serve`."""

from __future__ import annotations

import socket
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
    from fastboot.serve_isolated import strip_listen_flags

    argv = ["--host", "127.0.0.1", "--port=9000", "--max-model-len", "512", "--port", "1"]
    assert strip_listen_flags(argv) == ["--max-model-len", "512"]
    assert strip_listen_flags(["--hostname-like", "x"]) == ["--hostname-like", "x"]
