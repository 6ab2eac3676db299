"""The one size parser of the command line: `--ram 64M`, `--replica-memory 2g`, ..."""

from __future__ import annotations

import argparse
import re

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: A count, or a decimal with a unit; then K/M/G/T (binary), an optional I and an optional B.
_SIZE = re.compile(r"(\d+|(?:\d+\.\d*|\.\d+)(?=\s*[KMGT]))\s*([KMGT]?)I?B?")


def parse_size(text: str) -> int:
    """'512M', '4G', '1.5g', '.5G', '64 MiB', '512KiB', '2gb', '1048576' -> bytes (binary
    units, any case; a fraction needs a unit). An argparse type, so a bad value is a usage
    error naming the flag."""
    match = _SIZE.fullmatch(text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 4G, 1536m)")
    return int(float(match[1]) * UNITS[match[2]])
