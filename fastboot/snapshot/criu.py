"""Finding and running CRIU.

fastboot needs CRIU >= 4.2 on kernels >= 6.x (facts measured here, see FACTS.md):
criu 3.17 fails with "Unexpected rt vDSO area bounds", and 4.1.1 cannot dump TCP sockets on
kernels >= 6.16 ("Can't get 1:16 opt", SO_PASSCRED). Where the system's criu is older,
`fastboot install-criu` puts Debian unstable's criu with its own loader and libraries in a private
prefix (the system libc is never replaced); this module finds it there.

Search order: $FASTBOOT_CRIU, then `criu` on PATH if new enough, then the private prefix.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fastboot import envs
from fastboot.errors import CriuError, CriuMissingError

logger = logging.getLogger(__name__)

MIN_VERSION = (4, 2)
_VERSION_RE = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.MULTILINE)
INSTALL_HINT = "run `fastboot install-criu` as root, or set FASTBOOT_CRIU to a criu >= 4.2"


@dataclass(frozen=True)
class Criu:
    """A CRIU executable and the version it reported."""

    path: str
    """The executable (may be fastboot's wrapper around a private prefix)."""
    version: tuple[int, int, int]
    """(major, minor, patch) from `criu --version`."""

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def check(self, timeout: float = 60.0) -> str:
        """Run `criu check`; returns its output, raises CriuError when the kernel falls short."""
        try:
            result = subprocess.run(
                [self.path, "check"], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CriuError("check", str(exc)) from exc
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            lines = [ln for ln in output.splitlines() if "Error" in ln] or output.splitlines()
            raise CriuError("check", lines[-1] if lines else f"exit code {result.returncode}")
        return output


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The version in `criu --version` output ("Version: 4.2.1"), or None."""
    match = _VERSION_RE.search(text)
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def probe(path: str) -> Criu | None:
    """Run `path --version`; a Criu when it answers with a version, else None."""
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("criu at %s does not run: %s", path, exc)
        return None
    version = parse_version(result.stdout)
    return Criu(path, version) if version else None


def candidates() -> list[str]:
    """Executables to try, in order of preference."""
    found = []
    if override := envs.criu_override():
        return [override]
    if on_path := shutil.which("criu"):
        found.append(on_path)
    private = envs.criu_prefix() / "bin" / "criu"
    if os.access(private, os.X_OK):
        found.append(str(private))
    return found


def find_criu() -> Criu:
    """The CRIU to use: the first candidate that is new enough.

    Raises CriuMissingError naming what was found and how to get a new enough one.
    """
    seen = []
    for path in candidates():
        criu = probe(path)
        if criu is None:
            seen.append(f"{path} (does not run)")
        elif criu.version[:2] < MIN_VERSION:
            seen.append(f"{path} ({criu.version_text}, too old)")
        else:
            return criu
    need = ".".join(map(str, MIN_VERSION))
    found = "; found " + ", ".join(seen) if seen else ""
    raise CriuMissingError(f"fastboot needs criu >= {need}{found}; {INSTALL_HINT}")


def provision_script() -> Path:
    """The shipped script that installs a private CRIU (see its header)."""
    return Path(__file__).with_name("provision-criu.sh")
