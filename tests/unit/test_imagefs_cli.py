"""`fastboot image`: argument parsing and errors that say what to do."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fastboot.cli import image
from fastboot.cli.main import main
from fastboot.cli.sizes import parse_size


def test_sizes_parse() -> None:
    """One parser for every size flag: what `fastboot image` and `fastboot agent` each took."""
    assert parse_size("4M") == 4 << 20
    assert parse_size("512KiB") == 512 << 10
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("1000") == 1000
    assert parse_size("2g") == 2 << 30
    assert parse_size("1536mb") == 1536 << 20
    assert parse_size(" 1T ") == 1 << 40
    for bad in ("lots", "", "1.5.2G", "-1M", "4X", "M"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
            parse_size(bad)


def test_every_action_parses() -> None:
    parser = argparse.ArgumentParser()
    image.add_arguments(parser)
    for argv in (
        ["build", "src", "--name", "x", "--chunk-size", "1M"],
        ["mount", "x", "/mnt", "--remote", "http://127.0.0.1:1", "--prefetch-rate", "0"],
        ["umount", "/mnt", "--lazy"],
        ["ls"],
        ["verify", "x"],
        ["gc", "--cache-max", "10G"],
        ["push", "x", "--to", "/srv"],
        ["pull", "x", "--remote", "http://127.0.0.1:1", "--all"],
        ["rm", "x"],
    ):
        assert parser.parse_args(argv).action == argv[0]


def test_unknown_image_and_missing_remote_fail_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "store")
    assert main(["image", "--store", store, "verify", "nope"]) == 1
    assert "fastboot image build SRC --name nope" in capsys.readouterr().err
    assert main(["image", "--store", store, "pull", "nope"]) == 1
    assert "--remote URL" in capsys.readouterr().err
    assert main(["image", "--store", store, "pull", "x", "--remote", "ftp://h/"]) == 1
    assert "not an http:// URL" in capsys.readouterr().err
    assert main(["image", "--store", store, "ls"]) == 0
