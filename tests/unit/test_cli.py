"""The CLI dispatcher: lazy, light, and registered only with commands that exist."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from fastboot.cli import main as cli
from fastboot.cli.sizes import parse_size


def test_help_lists_commands_without_importing_heavy_modules() -> None:
    # In a fresh interpreter, so nothing imported by other tests can hide an import.
    code = (
        "import sys\n"
        "from fastboot.cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'vllm', 'transformers', 'numpy', 'tokenizers')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout
    for name in cli.COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_registered_command_module_has_the_contract(name: str) -> None:
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(module.add_arguments)
    assert callable(module.run)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    assert "doctor" in capsys.readouterr().out


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastboot", "--version"], capture_output=True, text=True, check=True
    )
    import fastboot

    assert out.stdout.strip() == f"fastboot {fastboot.__version__}"


GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10


@pytest.mark.parametrize(
    ("text", "size"),
    [
        # What `fastboot image` took (--chunk-size, --ram, --prefetch-rate, --cache-max):
        ("1048576", 1048576),
        ("0", 0),
        ("4M", 4 * MiB),
        ("512K", 512 * KiB),
        ("1T", 1 << 40),
        ("512KiB", 512 * KiB),
        ("4MB", 4 * MiB),
        ("1.5G", int(1.5 * GiB)),
        (".5G", GiB // 2),
        ("1.G", GiB),
        ("64 M", 64 * MiB),
        ("64 MiB", 64 * MiB),
        ("4B", 4),
        (" 1T ", 1 << 40),
        # What `fastboot agent` took (--replica-memory):
        ("2g", 2 * GiB),
        ("1536m", 1536 * MiB),
        ("2gib", 2 * GiB),
        ("2gb", 2 * GiB),
        ("2048k", 2 * MiB),
        ("4mi", 4 * MiB),
        ("4ib", 4),
    ],
)
def test_parse_size_accepts(text: str, size: int) -> None:
    """One parser for every size flag: the union of what `fastboot image` and `fastboot agent`
    each took (binary units, any case, optional i and b, a fraction only with a unit)."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "",
        "lots",
        "M",
        "4X",
        "1.5",
        "1.5B",
        "1.5.2G",
        "1..5G",
        ".G",
        "4MBB",
        "4 M B",
        "-1M",
        "+4M",
        "1e3K",
        "1_000",
        "infK",
    ],
)
def test_parse_size_rejects(text: str) -> None:
    """Neither a size nor a Python number literal's extras (sign, exponent, _): argparse then
    reports `invalid value` for the flag instead of a traceback."""
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
        parse_size(text)


def test_snapshot_create_takes_a_command_line_that_starts_with_a_flag(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """`snapshot create --fastboot-engine command ...` reaches create's own parsing (argparse's
    REMAINDER would refuse a first token that looks like an option, exit 2)."""
    code = cli.main(["snapshot", "--dir", str(tmp_path), "create", "--fastboot-engine", "command"])
    assert code == 1
    assert "needs the server's command after `--`" in capfd.readouterr().err
