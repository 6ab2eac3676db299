"""`fastboot model tiny --out DIR [--size tiny|1gib] [--format safetensors|gguf] [--force]`.

The model is a random-weight Llama that transformers and vLLM load like a downloaded checkpoint;
see `fastboot.models.tiny` for what it contains and why its bytes are reproducible. With
`--format gguf`, DIR also gets `model.gguf`, the same weights for llama.cpp
(`fastboot.models.gguf_export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastboot.models import tiny


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `tiny` subcommand and its flags to the `model` parser."""
    kinds = parser.add_subparsers(dest="model_kind", metavar="KIND", required=True)
    help_text = "A random-weight Llama (LlamaForCausalLM, bf16, 4096-token byte-level BPE)."
    sub = kinds.add_parser("tiny", help=help_text, description=help_text, allow_abbrev=False)
    sub.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="Directory to write (new or empty)."
    )
    sub.add_argument(
        "--size",
        choices=list(tiny.PRESETS),
        default="tiny",
        help="tiny: hidden 256, 4 layers, about 10 MB; 1gib: hidden 2048, 11 layers, about 1 GiB.",
    )
    sub.add_argument(
        "--format",
        choices=["safetensors", "gguf"],
        default="safetensors",
        help="gguf: also write DIR/model.gguf (f32, for llama.cpp; needs the `gguf` package).",
    )
    sub.add_argument(
        "--force", action="store_true", help="Replace DIR's contents if it is not empty."
    )


def run(args: argparse.Namespace) -> int:
    """Write the model and print where it is, its file count, size and weights digest."""
    out = tiny.write_tiny_llama(args.out, args.size, force=args.force)
    summary = tiny.summarize(out)
    print(out)
    print(f"files: {summary.files}")
    print(f"bytes: {summary.total_bytes}")
    print(f"weights sha256: {summary.weights_sha256}")
    if args.format == "gguf":
        from fastboot.models.gguf_export import GGUF_FILE, write_gguf  # imports gguf

        print(f"gguf: {write_gguf(out, out / GGUF_FILE)}")
    return 0
