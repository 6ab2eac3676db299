"""x86-64 micro-architecture levels as /proc/cpuinfo flag sets, and the highest one a CPU has.

The levels are the x86-64 psABI's (x86-64-v2: SSE4.2 and POPCNT, Nehalem and later; v3: AVX2,
FMA, BMI1/2, Haswell and Zen 1 and later; v4: AVX-512 F/BW/CD/DQ/VL, Skylake-SP and Zen 4 and
later), spelled the way the kernel names the features in /proc/cpuinfo: SSE3 is `pni`, LZCNT is
`abm`, LAHF/SAHF in 64-bit mode is `lahf_lm`. A snapshot whose code is held to a level restores
on every host whose flags include the level's set (fingerprint.incompatibility checks a subset).

`fastboot doctor` prints this host's level. Holding an engine's code to a level below the host's
(the `--fastboot-cpu-baseline` of issue #21) is not built yet; what it needs is in the module
doc's reference, docs/snapshots.md ("Portability across CPUs").
"""

from __future__ import annotations

from collections.abc import Iterable

#: x86-64 baseline (every x86-64 CPU): what the levels add to.
X86_64 = frozenset({"cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"})
X86_64_V2 = X86_64 | {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
X86_64_V3 = X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_64_V4 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

#: Level name -> the flags it requires, lowest first.
LEVELS: dict[str, frozenset[str]] = {
    "x86-64": X86_64,
    "x86-64-v2": X86_64_V2,
    "x86-64-v3": X86_64_V3,
    "x86-64-v4": X86_64_V4,
}


def highest_level(flags: Iterable[str]) -> str | None:
    """The highest level whose every flag is in flags; None below x86-64 (or not x86)."""
    have = set(flags)
    found = None
    for name, needed in LEVELS.items():
        if not needed <= have:
            break
        found = name
    return found


def missing(level: str, flags: Iterable[str]) -> list[str]:
    """The flags of level that flags lacks, sorted."""
    return sorted(LEVELS[level] - set(flags))
