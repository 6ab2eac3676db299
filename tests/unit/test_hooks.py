"""Loading --fastboot-hooks modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastboot.engines import hooks
from fastboot.errors import UsageError


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_no_module_means_no_op_hooks() -> None:
    loaded = hooks.load(None)
    assert loaded.source == "none"
    loaded.quiesce("http://x")  # does nothing, raises nothing
    loaded.resume("http://x")


def test_module_with_one_hook(module_dir: Path) -> None:
    (module_dir / "only_resume_hooks.py").write_text(
        "calls = []\ndef resume(url):\n    calls.append(url)\n"
    )
    loaded = hooks.load("only_resume_hooks")
    loaded.quiesce("http://a")
    loaded.resume("http://b")
    assert sys.modules["only_resume_hooks"].calls == ["http://b"]
    assert loaded.source == "only_resume_hooks"


def test_missing_or_empty_modules_are_usage_errors(module_dir: Path) -> None:
    with pytest.raises(UsageError, match="cannot import it"):
        hooks.load("no_such_hooks_module")
    (module_dir / "empty_hooks.py").write_text("x = 1\n")
    with pytest.raises(UsageError, match="defines neither quiesce nor resume"):
        hooks.load("empty_hooks")
