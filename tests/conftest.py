"""Shared test options and fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub: every model is generated locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-skips",
        action="store_true",
        help="fail the run if any test was skipped (this kind of machine has every capability)",
    )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--no-skips"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(
            f"--no-skips: {len(skipped)} test(s) skipped; failing the run", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The built-in tiny Llama, written once per test run."""
    from fastboot.models.tiny import write_tiny_llama

    out = tmp_path_factory.mktemp("models") / "tiny"
    yield write_tiny_llama(out, "tiny")


@pytest.fixture(scope="session")
def isolated_snapshot(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """One `fastboot snapshot create` of the tiny model per test run: (snapshot dir, id)."""
    from tests.agents import create_snapshot

    work = tmp_path_factory.mktemp("isolated")
    snapshots = work / "snapshots"
    return snapshots, create_snapshot(tiny_model, snapshots, work / "create.log")
