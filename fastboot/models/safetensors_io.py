"""A minimal, deterministic safetensors writer that streams, plus the bf16 conversion it needs.

The file is laid out exactly as the format specifies (https://github.com/huggingface/safetensors):

    8 bytes   little-endian u64: N, the length of the JSON header
    N bytes   JSON: {"__metadata__": {...}, NAME: {"dtype", "shape", "data_offsets"}, ...}
    ...       the tensors' bytes, back to back, in header order

Every choice that could vary is fixed, so the same tensors always give the same bytes: names are
sorted, the JSON is compact with sorted keys, and the header is padded with spaces (which the
format allows) so the data starts on an 8-byte boundary. Because every tensor's size is known
from its dtype and shape, the header is written first and the data streamed after it, one chunk
at a time; a 1 GiB file never needs 1 GiB of memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: Bytes per element of the safetensors dtypes this writer accepts.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "BF16": 2,
    "F16": 2,
    "I16": 2,
    "F32": 4,
    "I32": 4,
    "F64": 8,
    "I64": 8,
}

#: The metadata transformers and vLLM expect in a PyTorch checkpoint.
PT_METADATA: dict[str, str] = {"format": "pt"}

_ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's entry in the header: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported safetensors dtype {self.dtype!r} for {self.name}")
        if self.name == "__metadata__" or any(d < 0 for d in self.shape):
            raise ValueError(f"invalid tensor entry {self.name!r} {self.shape}")

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in the file."""
        return self.numel * DTYPE_SIZES[self.dtype]


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The first part of the file: the u64 length, then the padded JSON header.

    Tensors are laid out in sorted-name order whatever the order of `specs`; the returned length
    is a multiple of 8.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    header: dict[str, Any] = {"__metadata__": dict(PT_METADATA if metadata is None else metadata)}
    offset = 0
    for spec in sorted(specs, key=lambda s: s.name):
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


@dataclass(frozen=True)
class WriteResult:
    """What `write_safetensors` wrote: the file's size and the SHA-256 of all its bytes."""

    nbytes: int
    sha256: str


def write_safetensors(
    path: Path,
    specs: Sequence[TensorSpec],
    chunks: Callable[[TensorSpec], Iterable[bytes]],
    metadata: dict[str, str] | None = None,
) -> WriteResult:
    """Write `path` as a safetensors file, streaming each tensor's data from `chunks(spec)`.

    `chunks` is called once per tensor, in the sorted-name order of the header, and must yield
    exactly `spec.nbytes` bytes in total, little-endian, row-major; a mismatch raises ValueError
    (and leaves a partial file for the caller to discard). The file is hashed as it is written,
    so the digest costs no second read.
    """
    head = header_bytes(specs, metadata)
    digest = hashlib.sha256(head)
    total = len(head)
    with open(path, "wb") as f:
        f.write(head)
        for spec in sorted(specs, key=lambda s: s.name):
            written = 0
            for chunk in chunks(spec):
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
            if written != spec.nbytes:
                raise ValueError(
                    f"{spec.name}: got {written} bytes of data, expected {spec.nbytes}"
                )
            total += written
    return WriteResult(nbytes=total, sha256=digest.hexdigest())


def read_header(path: Path) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file (tensor entries and `__metadata__`)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        parsed: dict[str, Any] = json.loads(f.read(length))
    return parsed


def float32_to_bf16(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns of float32 `values`, rounded to nearest, ties to even.

    Done with integer operations on the float32 bits, so the result does not depend on the
    platform or on any library's bf16 support. NaNs are not special-cased: callers must not pass
    them (the model generator never makes any).
    """
    bits = np.array(values, dtype=np.float32, order="C").view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half-way cases to the even neighbour.
    # (In place: this runs over every weight of a 1 GiB model.)
    bias = bits >> np.uint32(16)
    bias &= np.uint32(1)
    bias += np.uint32(0x7FFF)
    bits += bias
    bits >>= np.uint32(16)
    return bits.astype(np.uint16)
