"""Read tests/gpu/serve_gpu.sh's logs into one JSON result (and say whether the run passed).

    python tests/gpu/serve_gpu_report.py WORKDIR [--json OUT]

WORKDIR holds, per run (`plain`, `cold`, `restore1`, `restore2`): NAME.log (fastboot's output,
or the plain server's), NAME.answer.json (the greedy completion asked after it was ready),
NAME.gpu (`nvidia-smi` used memory in MiB: before, serving, after, one per line) and, for the
plain run, plain.seconds (process start to first answer). Passed: the cold run made and
restored a snapshot, both later runs restored it without a cold boot, and every run answered
the plain server's greedy token ids.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

RUNS = ("plain", "cold", "restore1", "restore2")
COLD = re.compile(r"cold boot ready in ([\d.]+) s")
PUBLISHED = re.compile(r"snapshot (\w+) published: ([\d.]+) GB, dumped in ([\d.]+) s")
RESTORED = re.compile(r"restored snapshot (\w+) in ([\d.]+) s; cold boot was ([\d.]+) s")
WARNING = re.compile(r" fastboot (?:WARNING|ERROR) (.*)")


def read_run(work: Path, name: str) -> dict[str, Any]:
    """What one run's files say (missing files: the run did not get that far)."""
    log = work / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    run: dict[str, Any] = {"name": name, "warnings": WARNING.findall(text)}
    if match := COLD.search(text):
        run["cold_boot_s"] = float(match.group(1))
    if match := PUBLISHED.search(text):
        run["snapshot"] = match.group(1)
        run["snapshot_gb"] = float(match.group(2))
        run["dump_s"] = float(match.group(3))
    if match := RESTORED.search(text):
        run["restored"] = match.group(1)
        run["restore_s"] = float(match.group(2))
    answer = work / f"{name}.answer.json"
    if answer.exists():
        try:
            run["token_ids"] = json.loads(answer.read_text())["choices"][0]["token_ids"]
        except (ValueError, KeyError, IndexError, TypeError):
            run["token_ids"] = None
    gpu = work / f"{name}.gpu"
    if gpu.exists():
        used = [int(v) for v in gpu.read_text().split() if v.isdigit()]
        run["gpu_used_mib"] = dict(zip(("before", "serving", "after"), used, strict=False))
    seconds = work / f"{name}.seconds"
    if seconds.exists():
        run["first_answer_s"] = float(seconds.read_text())
    return run


def report(work: Path) -> dict[str, Any]:
    runs = {name: read_run(work, name) for name in RUNS}
    problems = []
    reference = runs["plain"].get("token_ids")
    if not reference:
        problems.append("the plain server gave no token ids")
    cold = runs["cold"]
    if "snapshot" not in cold or cold.get("restored") != cold.get("snapshot"):
        problems.append("the cold run did not publish and restore a snapshot")
    for name in ("restore1", "restore2"):
        run = runs[name]
        if "cold_boot_s" in run or run.get("restored") != cold.get("snapshot"):
            problems.append(f"{name} did not restore the snapshot")
    for name in ("cold", "restore1", "restore2"):
        if runs[name].get("token_ids") != reference:
            problems.append(f"{name} answered {runs[name].get('token_ids')}, plain {reference}")
    restores = [runs[n]["restore_s"] for n in ("restore1", "restore2") if "restore_s" in runs[n]]
    summary: dict[str, Any] = {
        "passed": not problems,
        "problems": problems,
        "plain_first_answer_s": runs["plain"].get("first_answer_s"),
        "cold_boot_s": cold.get("cold_boot_s"),
        "restore_s": restores,
        "runs": runs,
    }
    if restores and cold.get("cold_boot_s"):
        summary["cold_over_restore"] = cold["cold_boot_s"] / min(restores)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = report(args.work)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
