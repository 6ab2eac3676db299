"""The built-in Llama as one GGUF file, for llama.cpp (`fastboot model tiny --format gguf`).

Read from the safetensors directory `write_tiny_llama` wrote (not regenerated), so the GGUF holds
the same weights: bf16 widened to f32, which is exact, so llama.cpp and transformers in f32 compute
on identical numbers. What llama.cpp's `llama` architecture expects that a Hugging Face checkpoint
does not say the same way:

- tensor names: `token_embd`, `blk.N.attn_q`, ... (LLAMA_TENSOR_NAMES below);
- the q and k projections' rows reordered per head: transformers' rotary embedding rotates the
  two halves of each head (`rotate_half`), llama.cpp's `llama` rope rotates adjacent pairs, so
  row i of a head's first half and row i of its second half become rows 2i and 2i+1;
- the tokenizer as `gpt2` (byte-level BPE: the vocabulary in its byte-to-unicode spelling, the
  merges, GPT-2's pre-tokenizer regex, which is what `ByteLevel(add_prefix_space=False)` uses),
  special tokens typed CONTROL, BOS added in front (the post-processor's template).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fastboot.errors import UsageError
from fastboot.models.safetensors_io import read_header

#: transformers' per-layer names -> llama.cpp's.
LLAMA_TENSOR_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_FILE = "model.gguf"


def write_gguf(model_dir: Path, out: Path) -> Path:
    """Write model_dir (a `write_tiny_llama` directory) as the GGUF file out; returns out."""
    import gguf  # only this command needs it (the [test] extra)

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise UsageError(f"{model_dir} is not a Llama checkpoint fastboot wrote")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    _add_hyperparameters(writer, config)
    chat_template = json.loads((model_dir / "tokenizer_config.json").read_text()).get(
        "chat_template"
    )
    _add_tokenizer(writer, gguf, tokenizer, config, chat_template)
    for name, array in _llama_tensors(model_dir, config):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)  # never a half-written model at the published name
    return out


def _add_hyperparameters(writer: Any, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    writer.add_name("fastboot-tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(0)  # all f32


def _add_tokenizer(
    writer: Any,
    gguf: Any,
    tokenizer: dict[str, Any],
    config: dict[str, Any],
    chat_template: str | None,
) -> None:
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"] if t.get("special")}
    vocab.update(special)
    if sorted(vocab.values()) != list(range(config["vocab_size"])):
        raise UsageError("the tokenizer's ids are not 0..vocab_size-1")
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    types = [
        gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in tokens
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(True)
    if chat_template:
        writer.add_chat_template(chat_template)


def _llama_tensors(
    model_dir: Path, config: dict[str, Any]
) -> list[tuple[str, npt.NDArray[np.float32]]]:
    """(llama.cpp name, f32 array) for every weight, q/k rows reordered (module doc)."""
    weights = _read_bf16_safetensors(model_dir / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = [
        ("token_embd.weight", weights.pop("model.embed_tokens.weight")),
        ("output_norm.weight", weights.pop("model.norm.weight")),
        ("output.weight", weights.pop("lm_head.weight")),
    ]
    for i in range(config["num_hidden_layers"]):
        for hf, ours in LLAMA_TENSOR_NAMES.items():
            array = weights.pop(f"model.layers.{i}.{hf}.weight")
            if ours == "attn_q":
                array = _pairwise_rope_rows(array, heads)
            elif ours == "attn_k":
                array = _pairwise_rope_rows(array, kv_heads)
            out.append((f"blk.{i}.{ours}.weight", array))
    if weights:
        raise UsageError(f"tensors with no GGUF name: {', '.join(sorted(weights))}")
    return out


def _pairwise_rope_rows(w: npt.NDArray[np.float32], heads: int) -> npt.NDArray[np.float32]:
    """Rows of each head from [first half; second half] to interleaved pairs (module doc)."""
    rows, cols = w.shape
    half = rows // heads // 2
    return np.ascontiguousarray(w.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols))


def _read_bf16_safetensors(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """Every tensor of a bf16 safetensors file, widened to f32 (bf16 is f32's top 16 bits)."""
    header = read_header(path)
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        data = memoryview(f.read())[length:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "BF16":
            raise UsageError(f"{name} is {info['dtype']}, not BF16")
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[start:end], dtype="<u2").astype(np.uint32) << 16
        tensors[name] = raw.view(np.float32).reshape(info["shape"])
    return tensors
