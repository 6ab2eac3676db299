"""Random-weight Llama models for tests and benchmarks, generated locally and deterministically.

`write_tiny_llama(out, size)` writes a directory that transformers and vLLM load like any Hugging
Face checkpoint (`LlamaForCausalLM`, bf16 safetensors, a byte-level BPE tokenizer with a ChatML
chat template). Nothing is downloaded. The weights are the same bytes on every run, machine and
NumPy version (each tensor comes from the raw PCG64 stream seeded from its name, which NumPy keeps
stable, mapped to floats and to bf16 with integer-exact steps); the unit tests pin their digest.
The tokenizer is trained with the `tokenizers` library on `corpus.sentences`; its training is
deterministic because every byte is in the initial alphabet and no subword prefix or suffix is
used (the ids `tokenizers` assigns in hash-map order come only from those), so it too is the
same on every run with a given `tokenizers` version.

Presets (`PRESETS`), with the size of their `model.safetensors`:

    tiny   hidden 256, 4 layers, 4 heads / 2 KV heads (head_dim 64), MLP 688, vocab 4096:
           4,999,424 parameters, 10,003,032 bytes (9.5 MiB); 10.3 MB with the tokenizer
    1gib   hidden 2048, 11 layers, 16 heads / 8 KV heads (head_dim 128), MLP 5632, vocab 4096:
           535,869,440 parameters, 1,071,750,448 bytes (0.998 GiB)

The 1gib weights are streamed into the file tensor by tensor in 256 Ki-element chunks, so memory
stays small whatever the preset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastboot.errors import UsageError
from fastboot.models import corpus
from fastboot.models.safetensors_io import (
    TensorSpec,
    WriteResult,
    float32_to_bf16,
    write_safetensors,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

#: Standard deviation of every random weight; uniform on [-a, a] has std a / sqrt(3).
INIT_STD = 0.02

#: Special tokens, in id order from 0. Chat turns end with <|im_end|>, plain text with </s>.
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
BOS, EOS_TEXT, PAD, IM_START, IM_END = SPECIAL_TOKENS

#: Lines of `corpus.sentences` the tokenizer is trained on: enough to fill a 4096-token vocab
#: (about 5,500 tokens are reachable with `min_frequency=2`), small enough to take about a second.
TOKENIZER_CORPUS_LINES = 40_000

#: ChatML, as Qwen and others use it; `add_generation_prompt` opens the assistant's turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

WEIGHTS_FILE = "model.safetensors"

# Elements per chunk: small enough to stay in cache, which makes generation ~1.5x faster.
_CHUNK = 1 << 18
_BF16_ONE = b"\x80\x3f"
# Odd integers in (-2**24, 2**24) scaled by this land uniformly in (-a, a), a = sqrt(3) * std.
_SCALE = np.float32(INIT_STD * math.sqrt(3.0) / (1 << 24))


@dataclass(frozen=True)
class LlamaShape:
    """The architecture of a generated Llama; the fields mirror config.json."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 4096
    head_dim: int = 0
    """0 means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def head_size(self) -> int:
        """The head dimension actually used."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes of bf16 K and V one token takes in every layer's cache."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_size * 2

    def tensor_specs(self) -> list[TensorSpec]:
        """Every weight of `LlamaForCausalLM`, with transformers' names, all bf16."""
        h, q, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        d, m = self.head_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q * d, h),
                p + "self_attn.k_proj.weight": (kv * d, h),
                p + "self_attn.v_proj.weight": (kv * d, h),
                p + "self_attn.o_proj.weight": (h, q * d),
                p + "mlp.gate_proj.weight": (m, h),
                p + "mlp.up_proj.weight": (m, h),
                p + "mlp.down_proj.weight": (h, m),
            }
        return [TensorSpec(name, "BF16", shape) for name, shape in sorted(shapes.items())]

    @property
    def num_parameters(self) -> int:
        """Total number of weights."""
        return sum(spec.numel for spec in self.tensor_specs())

    def config(self, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict[str, Any]:
        """config.json, readable by transformers 4.x and 5.x (rope given both ways)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "head_dim": self.head_size,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": INIT_STD,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": False,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


PRESETS: dict[str, LlamaShape] = {
    "tiny": LlamaShape(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
    ),
    "1gib": LlamaShape(
        hidden_size=2048,
        num_hidden_layers=11,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=5632,
    ),
}


def tensor_seed(name: str) -> int:
    """The PCG64 seed of a tensor: the first 8 bytes of BLAKE2b(name), little-endian."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def tensor_chunks(spec: TensorSpec) -> Iterator[bytes]:
    """The bf16 bytes of one weight, in chunks: ones for norms, else uniform with std 0.02.

    Element k comes from raw draw k of PCG64(tensor_seed(name)): its top 24 bits u give the
    float32 (2u - 2**24 + 1) * a / 2**24, rounded to bf16 (nearest, ties to even).
    """
    if spec.dtype != "BF16":
        raise ValueError(f"{spec.name}: only BF16 weights are generated")
    if spec.name.endswith("norm.weight"):
        yield _BF16_ONE * spec.numel
        return
    bits = np.random.PCG64(tensor_seed(spec.name))
    for start in range(0, spec.numel, _CHUNK):
        raw = bits.random_raw(min(_CHUNK, spec.numel - start))
        # In place and in 32 bits: this loop is most of the time a 1 GiB model takes.
        values = (raw >> np.uint64(40)).astype(np.int32)
        values <<= 1
        values -= np.int32((1 << 24) - 1)
        floats = values.astype(np.float32)
        floats *= _SCALE
        yield float32_to_bf16(floats).astype("<u2").tobytes()


def train_tokenizer(
    lines: list[str], vocab_size: int = 4096, special_tokens: tuple[str, ...] = SPECIAL_TOKENS
) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` tokens, special tokens first (ids 0, 1, ...).

    Encoding adds `special_tokens[0]` (BOS) in front. If `lines` cannot fill the vocabulary,
    it is padded with special tokens `<|reserved_N|>` so the size always matches the model's.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(special_tokens),
        # All 256 byte symbols, so no id is ever assigned in hash-map order (see module doc).
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer.train_from_iterator(lines, trainer)
    for i, token in enumerate(special_tokens):
        if tokenizer.token_to_id(token) != i:
            raise RuntimeError(f"tokenizers placed {token} at {tokenizer.token_to_id(token)}")
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing < 0:
        raise RuntimeError(f"trained {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    tokenizer.add_special_tokens(
        [AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(missing)]
    )
    bos = special_tokens[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, 0)]
    )
    return tokenizer


def _dump_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_tokenizer_files(directory: Path, tokenizer: Tokenizer, max_length: int) -> None:
    # Re-serialised with sorted keys so the Rust serialiser's layout choices do not leak in.
    _dump_json(directory / "tokenizer.json", json.loads(tokenizer.to_str()))
    special = {
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": PAD,
        # transformers 5 calls these extra_special_tokens but still reads this name; 4.x
        # reads only this one.
        "additional_special_tokens": [IM_START, IM_END],
    }
    _dump_json(directory / "special_tokens_map.json", special)
    _dump_json(
        directory / "tokenizer_config.json",
        special
        | {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def _write_model(directory: Path, shape: LlamaShape) -> WriteResult:
    tokenizer = train_tokenizer(corpus.sentences(TOKENIZER_CORPUS_LINES), shape.vocab_size)
    _write_tokenizer_files(directory, tokenizer, shape.max_position_embeddings)
    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    _dump_json(directory / "config.json", shape.config(ids[BOS], ids[IM_END], ids[PAD]))
    _dump_json(
        directory / "generation_config.json",
        {
            "bos_token_id": ids[BOS],
            "eos_token_id": [ids[IM_END], ids[EOS_TEXT]],
            "pad_token_id": ids[PAD],
        },
    )
    return write_safetensors(directory / WEIGHTS_FILE, shape.tensor_specs(), tensor_chunks)


def _check_target(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out} exists and is not a directory; pick another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} is not empty; pass --force to replace it, or pick another --out")


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished `staging` directory to `out` (renames, so `out` is never half-written)."""
    _check_target(out, force)
    if not out.exists():
        os.rename(staging, out)
        return
    if not any(out.iterdir()):
        os.rename(staging, out)  # POSIX rename replaces an empty directory atomically
        return
    # Two renames (Python has no RENAME_EXCHANGE): `out` is briefly missing, never mixed.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.rename(out, old / out.name)
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(old / out.name, out)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_tiny_llama(out: Path, size: str = "tiny", *, force: bool = False) -> Path:
    """Write a random-weight Llama of preset `size` ("tiny" or "1gib") to the directory `out`.

    `out` must be missing or empty unless `force`, in which case its contents are replaced.
    The model is built in a hidden temporary directory beside `out` and renamed into place, so
    `out` holds either nothing new or the whole model. Files are 0644, the directory 0755.
    Nothing is fsynced: a test model is cheaper to regenerate than to make crash-proof.
    Returns `out`. Raises UsageError for an unknown size or an `out` that cannot be used.
    """
    if size not in PRESETS:
        raise UsageError(f"unknown model size {size!r}; choose one of {', '.join(PRESETS)}")
    shape = PRESETS[size]
    out = Path(out).absolute()
    _check_target(out, force)
    started = time.monotonic()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc}; pick another --out") from exc
    try:
        result = _write_model(staging, shape)
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)
        _publish(staging, out, force)
    except OSError as exc:
        raise UsageError(f"cannot write the model to {out}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "wrote %s Llama (%d parameters, weights sha256 %s…) to %s in %.2f s",
        size,
        shape.num_parameters,
        result.sha256[:12],
        out,
        time.monotonic() - started,
    )
    return out


@dataclass(frozen=True)
class ModelSummary:
    """What a model directory holds, as `fastboot model` reports it."""

    files: int
    total_bytes: int
    weights_sha256: str


def summarize(model_dir: Path) -> ModelSummary:
    """Count the files and bytes under `model_dir` and hash its model.safetensors (SHA-256)."""
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    digest = hashlib.sha256()
    with open(model_dir / WEIGHTS_FILE, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return ModelSummary(
        files=len(files),
        total_bytes=sum(p.stat().st_size for p in files),
        weights_sha256=digest.hexdigest(),
    )


#: Context length and concurrency the built-in models are served with in tests, demo, benchmarks.
SERVE_MAX_MODEL_LEN = 512
SERVE_MAX_NUM_SEQS = 4


def cpu_serve_flags(size: str = "tiny") -> list[str]:
    """`vllm serve` flags for a built-in model on CPU, with the KV cache sized to what
    SERVE_MAX_MODEL_LEN x SERVE_MAX_NUM_SEQS needs (twice over, 32 MiB at least).

    vLLM's CPU backend allocates and touches its whole KV cache at start-up, so it is dumped page
    for page into a snapshot: sizing it to the need keeps rebuildable cache out of the image.
    """
    need = SERVE_MAX_MODEL_LEN * SERVE_MAX_NUM_SEQS * PRESETS[size].kv_cache_bytes_per_token()
    kv_bytes = max(32 << 20, 2 * need)
    return [
        "--host", "127.0.0.1",
        "--max-model-len", str(SERVE_MAX_MODEL_LEN),
        "--max-num-seqs", str(SERVE_MAX_NUM_SEQS),
        "--kv-cache-memory-bytes", str(kv_bytes),
    ]  # fmt: skip
