"""x86-64 micro-architecture levels as /proc/cpuinfo flag sets, and the highest one a CPU has.

The levels are the x86-64 psABI's (x86-64-v2: SSE4.2 and POPCNT, Nehalem and later; v3: AVX2,
FMA, BMI1/2, Haswell and Zen 1 and later; v4: AVX-512 F/BW/CD/DQ/VL, Skylake-SP and Zen 4 and
later), spelled the way the kernel names the features in /proc/cpuinfo: SSE3 is `pni`, LZCNT is
`abm`, LAHF/SAHF in 64-bit mode is `lahf_lm`. A snapshot whose code is held to a level restores
on every host whose flags include the level's set (fingerprint.incompatibility checks a subset).

A ceiling (`--fastboot-cpu-baseline LEVEL`) holds the engine's code to a level below its host's:
baseline_env() is the environment that makes each library that picks its instructions at run
time pick at most the level's, and ceiling_flags() what the snapshot then records as the flags
its code may use. Each variable, and how it was confirmed on this project's machines, is in
docs/snapshots.md ("Portability across CPUs"). `native` is no ceiling: the host's own flags.
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


NATIVE = "native"
#: Levels an engine's code can be held to (x86-64 v1 is below what any engine here runs on).
BASELINES = (NATIVE, "x86-64-v2", "x86-64-v3", "x86-64-v4")

#: Features libraries pick at run time with nothing here to stop them (OpenSSL's AES-NI and
#: carry-less multiply in hashlib/ssl, RDRAND): a snapshot keeps requiring them where its
#: making host had them, whatever the ceiling.
UNMASKED = frozenset({"aes", "pclmulqdq", "rdrand"})

#: glibc's names (GLIBC_TUNABLES=glibc.cpu.hwcaps=-NAME,...) of the features above each level.
_GLIBC_ABOVE = {
    "x86-64-v4": ("AVX512_VNNI", "AVX512_BF16", "AVX512_FP16", "AMX_BF16", "AMX_INT8", "AMX_TILE"),
    "x86-64-v3": ("AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX512_VNNI"),
    "x86-64-v2": ("AVX", "AVX2", "FMA", "F16C", "BMI1", "BMI2", "LZCNT", "MOVBE", "AVX512F"),
}
#: numpy's dispatch targets above each level (NPY_DISABLE_CPU_FEATURES).
_AVX512_GROUPS = ("AVX512F", "AVX512CD", "AVX512_SKX")
_NUMPY_ABOVE = {
    "x86-64-v4": ("AVX512_CLX", "AVX512_CNL", "AVX512_ICL", "AVX512_SPR"),
    "x86-64-v3": (*_AVX512_GROUPS, "AVX512_CLX", "AVX512_CNL", "AVX512_ICL", "AVX512_SPR"),
    "x86-64-v2": ("AVX", "F16C", "FMA3", "AVX2", *_AVX512_GROUPS, "AVX512_CLX", "AVX512_CNL",
                  "AVX512_ICL", "AVX512_SPR"),
}  # fmt: skip
#: level -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, OPENBLAS_CORETYPE, MKL_ENABLE_INSTRUCTIONS)
_LIBRARY_CEILINGS = {
    "x86-64-v4": ("avx512", "AVX512_CORE", "SKYLAKEX", "AVX512"),
    "x86-64-v3": ("avx2", "AVX2", "HASWELL", "AVX2"),
    "x86-64-v2": ("default", "SSE41", "NEHALEM", "SSE4_2"),
}
#: The variable the engine-side start-up hook reads (patches/cpu_ceiling/sitecustomize.py).
BASELINE_ENV = "FASTBOOT_CPU_BASELINE"


def baseline_env(level: str) -> dict[str, str]:
    """The environment that holds an engine's libraries to level ({} for native)."""
    if level == NATIVE:
        return {}
    if level not in _LIBRARY_CEILINGS:
        raise ValueError(f"unknown CPU baseline {level!r}: one of {', '.join(BASELINES)}")
    aten, onednn, openblas, mkl = _LIBRARY_CEILINGS[level]
    return {
        BASELINE_ENV: level,
        "GLIBC_TUNABLES": "glibc.cpu.hwcaps=" + ",".join(f"-{f}" for f in _GLIBC_ABOVE[level]),
        "ATEN_CPU_CAPABILITY": aten,
        "ONEDNN_MAX_CPU_ISA": onednn,
        "OPENBLAS_CORETYPE": openblas,
        "MKL_ENABLE_INSTRUCTIONS": mkl,
        "NPY_DISABLE_CPU_FEATURES": " ".join(_NUMPY_ABOVE[level]),
    }


def ceiling_flags(level: str, host_flags: Iterable[str]) -> tuple[str, ...]:
    """The flags a snapshot held to level records: the level's, and the UNMASKED ones this
    host has. ValueError if this host is below level (it cannot run code built for it)."""
    have = set(host_flags)
    if level == NATIVE:
        return tuple(sorted(have))
    if lacking := missing(level, have):
        raise ValueError(f"this CPU is below {level}: it lacks {', '.join(lacking)}")
    return tuple(sorted(LEVELS[level] | (have & UNMASKED)))
