"""SGLang adapter: vllm-style argv -> sglang.launch_server argv, version hint, readiness."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest

from fastboot.engines import sglang
from fastboot.errors import DependencyError, UsageError


def test_the_brief_example() -> None:
    argv = [
        "--port",
        "9000",
        "--host",
        "127.0.0.1",
        "--max-model-len",
        "4096",
        "--tensor-parallel-size",
        "2",
    ]
    assert sglang.translate("org/model", argv).argv == [
        "--model-path",
        "org/model",
        "--port",
        "9000",
        "--host",
        "127.0.0.1",
        "--context-length",
        "4096",
        "--tp-size",
        "2",
    ]


def test_equals_form_short_flags_and_switches() -> None:
    t = sglang.translate(
        "/m",
        [
            "--max-num-seqs=8",
            "-tp",
            "4",
            "--seed=0",
            "--enforce-eager",
            "--no-enable-prefix-caching",
            "--enable-prefix-caching",
            "--trust-remote-code",
            "--enable-sleep-mode",
        ],
    )
    assert t.argv[2:] == [
        "--max-running-requests",
        "8",
        "--tp-size",
        "4",
        "--random-seed",
        "0",
        "--disable-cuda-graph",
        "--disable-radix-cache",
        "--trust-remote-code",
        "--enable-memory-saver",
        "--port",
        "8000",
        "--host",
        "0.0.0.0",
    ]
    assert t.warnings == []


def test_unknown_flags_pass_verbatim_with_a_warning() -> None:
    t = sglang.translate("/m", ["--attention-backend", "triton", "--port", "1", "--host", "h"])
    assert t.argv == [
        "--model-path",
        "/m",
        "--attention-backend",
        "triton",
        "--port",
        "1",
        "--host",
        "h",
    ]
    assert len(t.warnings) == 1 and "--attention-backend" in t.warnings[0]


def test_approximate_translation_is_warned() -> None:
    t = sglang.translate("/m", ["--gpu-memory-utilization", "0.8"])
    assert t.argv[2:4] == ["--mem-fraction-static", "0.8"]
    assert "weights and KV cache only" in t.warnings[0]


def test_command_runs_this_python_and_logs_warnings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fastboot.engines.sglang"):
        cmd = sglang.command("/m", ["--foo"])
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert cmd[3:6] == ["--model-path", "/m", "--foo"]
    assert "--foo is not a flag fastboot translates" in caplog.text


@pytest.mark.parametrize(
    ("model", "argv", "message"),
    [
        ("--port", [], "the model comes first"),
        ("/m", ["--max-model-len"], "--max-model-len needs a value"),
        ("/m", ["--model", "/other"], "give the model once"),
    ],
)
def test_usage_errors(model: str, argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        sglang.translate(model, argv)


def test_version_without_sglang_gives_install_hint() -> None:
    if importlib.util.find_spec("sglang") is not None:
        assert sglang.version()
        return
    with pytest.raises(DependencyError, match=r"pip install 'fastboot\[sglang\]'"):
        sglang.version()


def test_wait_ready_fails_fast_when_the_engine_exited() -> None:
    from fastboot.engines import EngineError

    with pytest.raises(EngineError, match="exited before it was ready"):
        sglang.wait_ready("http://127.0.0.1:9", 5, lambda: False)
