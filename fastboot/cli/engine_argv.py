"""Split `fastboot serve` argv into MODEL, fastboot's own flags, and the engine's flags.

The contract (the same one `vllm serve [model_tag] [options]` documents):

- MODEL is the first token. `--model X` (or `model:` in a `--config` YAML) is accepted where the
  engine accepts it, and then stays in the engine's argv where the user put it.
- fastboot's flags all start with `--fastboot-`, so they never collide with an engine flag; they
  are matched exactly (no abbreviations; `_` and `-` are the same, as vLLM allows).
- Every other token goes to the engine verbatim and in order. A bare `--` ends fastboot's
  parsing: everything after it is the engine's, even tokens that look like fastboot flags.

Why not argparse's parse_known_args: with an unknown option before MODEL it binds the option's
value to MODEL (`--tensor-parallel-size 2 M` -> model "2"), abbreviations let `--fastboot-s`
match silently, and it cannot know which engine flags take values. So fastboot never guesses at
engine flags: it reads only MODEL, its own flags, and (read-only) --host/--port/--config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastboot.errors import UsageError

PREFIX = "--fastboot-"


@dataclass(frozen=True)
class FlagSpec:
    """One fastboot flag of `fastboot serve`."""

    name: str
    """Long name without the prefix, e.g. "snapshot-dir" for --fastboot-snapshot-dir."""
    help: str
    """One line for --help."""
    takes_value: bool = False
    """True for `--fastboot-x VALUE` / `--fastboot-x=VALUE`, False for a switch."""

    @property
    def flag(self) -> str:
        return PREFIX + self.name


@dataclass(frozen=True)
class SplitArgv:
    """The result of splitting `fastboot serve` argv."""

    model: str
    """The model: a local directory or a hub-style name, exactly as given."""
    fastboot: dict[str, str | bool] = field(default_factory=dict)
    """fastboot flags that were given: name -> value (True for switches)."""
    engine_argv: list[str] = field(default_factory=list)
    """What the engine gets after MODEL, verbatim and in order (without a bare `--`)."""
    separator: int | None = None
    """Where in engine_argv the tokens after a bare `--` begin (None: there was none)."""

    def engine_value(self, flag: str) -> str | None:
        """The last value given to an engine flag (`--port 8001` or `--port=8001`), else None."""
        return _last_value(self.engine_argv, flag)

    @property
    def host(self) -> str | None:
        return self.engine_value("--host") or _config_value(self.engine_argv, "host")

    @property
    def port(self) -> int | None:
        value = self.engine_value("--port") or _config_value(self.engine_argv, "port")
        if value is None:
            return None
        try:
            return int(value)
        except ValueError as exc:
            raise UsageError(f"--port must be a number, got {value!r}") from exc


def split_serve_argv(
    argv: Sequence[str], specs: Sequence[FlagSpec], model_required: bool = True
) -> SplitArgv:
    """Split argv as described in the module docstring. Raises UsageError with the fix.
    model_required False: no MODEL is model "" (the caller decides; see missing_model)."""
    by_name = {spec.name: spec for spec in specs}
    tokens = list(argv)
    model: str | None = None
    if tokens and tokens[0] != "--" and not tokens[0].startswith("-"):
        model = tokens.pop(0)
    fastboot: dict[str, str | bool] = {}
    engine: list[str] = []
    separator = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            separator = len(engine)
            engine.extend(tokens[i + 1 :])
            break
        if not _is_fastboot_flag(token):
            engine.append(token)
            i += 1
            continue
        name, eq, inline = token[len(PREFIX) :].partition("=")
        name = name.replace("_", "-")
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(s.flag for s in specs) or "none"
            raise UsageError(f"unknown fastboot flag {token.split('=')[0]} (known: {known})")
        if not spec.takes_value:
            if eq:
                raise UsageError(f"{spec.flag} is a switch and takes no value")
            fastboot[name] = True
        elif eq:
            fastboot[name] = inline
        elif i + 1 < len(tokens) and tokens[i + 1] != "--":
            i += 1
            fastboot[name] = tokens[i]
        else:
            raise UsageError(f"{spec.flag} needs a value")
        i += 1
    if model is None:
        model = _last_value(engine, "--model") or _config_value(engine, "model")
    if model is None and model_required:
        raise missing_model(argv)
    return SplitArgv(model=model or "", fastboot=fastboot, engine_argv=engine, separator=separator)


def missing_model(argv: Sequence[str]) -> UsageError:
    """The error for a command line without MODEL."""
    first = argv[0] if argv else None
    hint = f" (got {first!r} first)" if first else ""
    return UsageError(
        f"MODEL must be the first argument{hint}: "
        "fastboot serve MODEL [engine flags] [--fastboot-... flags]"
    )


def _is_fastboot_flag(token: str) -> bool:
    return token.replace("_", "-").startswith(PREFIX)


def _last_value(argv: Sequence[str], flag: str) -> str | None:
    """Last value of `flag` in argv, in either `flag V` or `flag=V` form; `_`/`-` insensitive."""
    want = flag.replace("_", "-")
    value = None
    for i, token in enumerate(argv):
        name, eq, inline = token.partition("=")
        if name.replace("_", "-") != want:
            continue
        if eq:
            value = inline
        elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]
    return value


def _config_value(argv: Sequence[str], key: str) -> str | None:
    """`key` from the YAML file given with --config, if any (the engine reads it too)."""
    path = _last_value(argv, "--config")
    if path is None:
        return None
    import yaml

    try:
        data: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read --config {path}: {exc}") from exc
    if not isinstance(data, dict):
        return None
    value = data.get(key, data.get(key.replace("-", "_")))
    return None if value is None else str(value)
