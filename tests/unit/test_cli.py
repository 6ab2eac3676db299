"""The CLI dispatcher: lazy, light, and registered only with commands that exist."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from fastboot.cli import main as cli


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
