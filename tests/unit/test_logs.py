"""fastboot's log handler follows sys.stderr, so a swapped and closed stderr breaks nothing."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from fastboot import logs


def test_lines_go_to_the_current_stderr_even_after_the_first_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    saved = logging.getLogger("fastboot").handlers[:]
    try:
        logs.configure("INFO")
        logging.getLogger("fastboot.test").info("to the first")
        first.close()  # what pytest does to a test's captured stderr when the test ends
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("fastboot.test").info("to the second")
    finally:
        logging.getLogger("fastboot").handlers[:] = saved
    assert "Logging error" not in second.getvalue()
    assert second.getvalue().strip().endswith("fastboot INFO to the second")
