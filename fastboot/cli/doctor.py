"""`fastboot doctor [--mode M] [--engine E] [--json]`: one line per capability, and the fix."""

from __future__ import annotations

import argparse
import json

from fastboot import doctor, engines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=doctor.MODES,
        default="auto",
        help="what you will run; exit non-zero if it cannot (auto: gpu if one answers, else cpu)",
    )
    parser.add_argument(
        "--engine", choices=engines.NAMES, default=engines.DEFAULT, help="engine to require"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")


def run(args: argparse.Namespace) -> int:
    checks = doctor.run_checks(args.engine)
    mode = doctor.resolve_mode(args.mode, checks)
    failures = doctor.required_failures(checks, mode)
    if args.json:
        document = {
            "mode": mode,
            "ok": not failures,
            "checks": [c.to_json() for c in checks],
        }
        print(json.dumps(document, indent=2))
        return 1 if failures else 0
    width = max(len(c.name) for c in checks)
    for c in checks:
        status = "ok" if c.ok else ("FAIL" if c in failures else "warn")
        line = f"{status:<4}  {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"  -> fix: {c.fix}"
        print(line)
        for item in c.items:
            print(f"{'':<4}  {'':<{width}}    {item}")
    verdict = "ready" if not failures else f"not ready ({', '.join(c.name for c in failures)})"
    print(f"mode {mode}: {verdict}")
    return 1 if failures else 0
