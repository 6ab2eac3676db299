"""The argv splitter `fastboot serve` uses: MODEL first, --fastboot-* ours, the rest verbatim."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastboot.cli.engine_argv import FlagSpec, split_serve_argv
from fastboot.errors import UsageError

SPECS = [
    FlagSpec("snapshot-dir", "where snapshots live", takes_value=True),
    FlagSpec("no-snapshot", "cold boot only"),
    FlagSpec("refresh", "re-create the snapshot"),
]


def test_model_first_and_everything_else_verbatim_in_order() -> None:
    argv = ["Qwen/Qwen3-0.6B", "--tensor-parallel-size", "2", "--max-model-len=512", "-O3"]
    split = split_serve_argv(argv, SPECS)
    assert split.model == "Qwen/Qwen3-0.6B"
    assert split.engine_argv == ["--tensor-parallel-size", "2", "--max-model-len=512", "-O3"]
    assert split.fastboot == {}


def test_option_before_model_is_refused_not_misparsed() -> None:
    # parse_known_args would bind "2" to MODEL here; the splitter must say what to write instead.
    with pytest.raises(UsageError, match=r"MODEL must be the first argument.*--tensor-parallel"):
        split_serve_argv(["--tensor-parallel-size", "2", "Qwen/Qwen3-0.6B"], SPECS)


def test_fastboot_flags_are_taken_out_wherever_they_stand() -> None:
    argv = [
        "m",
        "--port",
        "8001",
        "--fastboot-snapshot-dir",
        "/snaps",
        "--dtype",
        "bfloat16",
        "--fastboot-refresh",
        "--fastboot_no_snapshot",
    ]
    split = split_serve_argv(argv, SPECS)
    assert split.fastboot == {"snapshot-dir": "/snaps", "refresh": True, "no-snapshot": True}
    assert split.engine_argv == ["--port", "8001", "--dtype", "bfloat16"]
    assert split.port == 8001


def test_inline_value_form() -> None:
    split = split_serve_argv(["m", "--fastboot-snapshot-dir=/a=b"], SPECS)
    assert split.fastboot == {"snapshot-dir": "/a=b"}


def test_no_abbreviations_and_unknown_flags_named() -> None:
    with pytest.raises(UsageError, match=r"unknown fastboot flag --fastboot-snap .*snapshot-dir"):
        split_serve_argv(["m", "--fastboot-snap", "/x"], SPECS)


def test_switch_with_value_and_missing_value_are_errors() -> None:
    with pytest.raises(UsageError, match="takes no value"):
        split_serve_argv(["m", "--fastboot-refresh=yes"], SPECS)
    with pytest.raises(UsageError, match="needs a value"):
        split_serve_argv(["m", "--fastboot-snapshot-dir"], SPECS)


def test_double_dash_passes_the_rest_verbatim() -> None:
    argv = ["m", "--fastboot-refresh", "--", "--flag", "--fastboot-refresh", "x"]
    split = split_serve_argv(argv, SPECS)
    assert split.fastboot == {"refresh": True}
    assert split.engine_argv == ["--flag", "--fastboot-refresh", "x"]


def test_port_and_host_are_read_not_removed() -> None:
    split = split_serve_argv(["m", "--host", "127.0.0.1", "--port=9000", "--port", "9001"], SPECS)
    assert split.engine_argv == ["--host", "127.0.0.1", "--port=9000", "--port", "9001"]
    assert split.host == "127.0.0.1"
    assert split.port == 9001  # the last one wins, as in argparse
    assert split_serve_argv(["m"], SPECS).port is None
    with pytest.raises(UsageError, match="--port must be a number"):
        _ = split_serve_argv(["m", "--port", "http"], SPECS).port


def test_config_yaml_passes_through_and_supplies_model_and_port(tmp_path: Path) -> None:
    config = tmp_path / "x.yaml"
    config.write_text("model: /models/tiny\nport: 8123\nmax-model-len: 256\n")
    split = split_serve_argv(["--config", str(config)], SPECS)
    assert split.model == "/models/tiny"
    assert split.engine_argv == ["--config", str(config)]
    assert split.port == 8123
    # With MODEL given, --config still passes through untouched, and the command line wins.
    split = split_serve_argv(["m", "--config", str(config), "--port", "9"], SPECS)
    assert (split.model, split.port) == ("m", 9)
    assert split.engine_argv == ["--config", str(config), "--port", "9"]


def test_unreadable_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read --config"):
        split_serve_argv(["--config", str(tmp_path / "missing.yaml")], SPECS)


def test_model_flag_is_accepted_and_kept_for_the_engine() -> None:
    split = split_serve_argv(["--model", "m", "--port", "8000"], SPECS)
    assert split.model == "m"
    assert split.engine_argv == ["--model", "m", "--port", "8000"]


def test_no_model_at_all() -> None:
    with pytest.raises(UsageError, match="MODEL must be the first argument"):
        split_serve_argv([], SPECS)
