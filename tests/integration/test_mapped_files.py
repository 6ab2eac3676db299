"""A mapped library rebuilt under the same path is never run against the snapshot's memory.

The fingerprint compares glibc, Python and the engine by version; what guards the files a
restored process maps by content is CRIU: at restore it compares each mapped ELF file's build-id
with the one it dumped (`--file-validation buildid`, CRIU's default) and fails the restore where
they differ, and fastboot then cold boots. Shown with a server (tests/servers/
mapped_library_server.py) whose answers come from a library named only in its environment, so
the snapshot key does not hold the library's content: after the library is rebuilt, the next
`fastboot serve` refuses the restore on CRIU's word and serves the new library's answers from a
cold boot, never the old ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.engine_process import RESTORED, FastbootRun, free_port, serving

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores need root"),
]

SERVER = Path(__file__).resolve().parents[1] / "servers" / "mapped_library_server.py"
COLD = r"cold boot ready in ([\d.]+) s"


def build_library(path: Path, factor: int) -> None:
    """libanswer.so whose answer(x) is x * factor + 1, replacing path atomically."""
    source = path.with_suffix(".c")
    source.write_text(f"int answer(int x) {{ return x * {factor} + 1; }}\n")
    built = path.with_suffix(".new")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(built), str(source)], check=True)
    built.rename(path)


def token_ids(port: int) -> list[int]:
    body = json.dumps({"model": "mapped-library", "prompt": "x", "max_tokens": 4}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        ids: list[int] = json.loads(response.read())["choices"][0]["token_ids"]
    return ids


def test_a_rebuilt_library_fails_the_restore_and_fastboot_cold_boots(tmp_path: Path) -> None:
    library, port = tmp_path / "libanswer.so", free_port()
    build_library(library, 7)
    argv = [
        "mapped-library",
        "--fastboot-engine",
        "command",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--fastboot-snapshot-dir",
        str(tmp_path / "snapshots"),
        "--",
        sys.executable,
        str(SERVER),
        "--host",
        "{host}",
        "--port",
        "{port}",
    ]
    env = {"TMPDIR": str(tmp_path), "MAPPED_LIBRARY": str(library)}
    with serving(FastbootRun(argv, tmp_path / "first.log", env), RESTORED, 120) as first:
        assert token_ids(port) == [1, 8, 15, 22]
        old = first.wait_for(RESTORED, 1).group(1)
        assert first.interrupt(signal.SIGINT) == 0

    build_library(library, 9)
    with serving(FastbootRun(argv, tmp_path / "second.log", env), COLD, 120) as second:
        lines = second.fastboot_lines()
        refused = [line for line in lines if "criu restore failed" in line and old in line]
        assert refused and "bad build-ID" in refused[0], "\n".join(lines)
        # After the cold boot fastboot snapshots the new library's process under the same key
        # (the library is not in it), replacing the refused snapshot, and proves it with a
        # restore of its own. The port is not served between the two (the dump stops the
        # cold-booted tree), so the cold boot's answers are read from the oracle it recorded.
        second.wait_for(RESTORED, 60)
        (snapshot,) = [p for p in (tmp_path / "snapshots").iterdir() if p.name[0] != "."]
        manifest = json.loads((snapshot / "manifest.json").read_text())
        assert manifest["oracle"]["token_ids"][:4] == [1, 10, 19, 28]
        assert token_ids(port) == [1, 10, 19, 28]
        assert second.interrupt(signal.SIGINT) == 0
