"""`fastboot model tiny` and `fastboot.models`: deterministic bytes, loadable files, safe writes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastboot.cli.main import main
from fastboot.errors import UsageError
from fastboot.models import corpus, safetensors_io, tiny

#: SHA-256 of the tiny preset's model.safetensors. It must never change by accident: every
#: machine, NumPy and Python version has to produce these exact bytes.
TINY_WEIGHTS_SHA256 = "601effbb6c4a79682abff03c2fae289106805674bc76ee7bf506a24390b123c8"

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def file_digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_two_runs_write_the_same_bytes(model_dir: Path, tmp_path: Path) -> None:
    again = tiny.write_tiny_llama(tmp_path / "again")
    assert file_digests(again) == file_digests(model_dir)


def test_weights_digest_is_pinned(model_dir: Path) -> None:
    assert tiny.summarize(model_dir).weights_sha256 == TINY_WEIGHTS_SHA256


def test_expected_files_with_plain_modes(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    assert model_dir.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in model_dir.iterdir())
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]


def test_json_files_are_canonical(model_dir: Path) -> None:
    for name in EXPECTED_FILES - {"model.safetensors"}:
        text = (model_dir / name).read_text()
        canonical = json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
        assert text == canonical + "\n"


def test_config_is_a_sane_llama(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["hidden_size"] == 256
    assert config["num_hidden_layers"] == 4
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["head_dim"] == 64
    assert config["intermediate_size"] == 688
    assert config["vocab_size"] == 4096
    assert config["max_position_embeddings"] == 2048
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is False

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"]
    assert config["bos_token_id"] == tok.token_to_id("<s>")
    assert config["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert config["pad_token_id"] == tok.token_to_id("<pad>")
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.token_to_id("<|im_end|>"), tok.token_to_id("</s>")]
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<s>", "<|im_end|>")
    assert tok_config["model_max_length"] == 2048


def test_tokenizer_round_trips_text(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = 'The quick model, "restored" in 1.84 s!\nÜnïcödé → 日本語 too.  Two  spaces.'
    ids = tok.encode(text).ids
    assert ids[0] == tok.token_to_id("<s>")
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # it learned merges, not just bytes
    # A learned word is one token (with its leading space, byte-level style).
    assert len(tok.encode(" river", add_special_tokens=False).ids) == 1
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    chat_ids = tok.encode(chat, add_special_tokens=False).ids
    assert chat_ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.token_to_id("<|im_end|>") in chat_ids
    assert tok.decode(chat_ids, skip_special_tokens=False) == chat


def test_chat_template_renders(model_dir: Path) -> None:
    jinja2 = pytest.importorskip("jinja2.sandbox", reason="chat templates need jinja2")
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    # The environment transformers renders chat templates with.
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    render = env.from_string(template).render
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert render(messages=messages, add_generation_prompt=False) == expected
    assert render(messages=messages, add_generation_prompt=True) == (
        expected + "<|im_start|>assistant\n"
    )


def test_safetensors_header_and_tensors(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    header = safetensors_io.read_header(path)
    (length,) = np.frombuffer(path.read_bytes()[:8], dtype="<u8")
    assert (8 + int(length)) % 8 == 0
    assert header.pop("__metadata__") == {"format": "pt"}
    specs = {s.name: s for s in tiny.PRESETS["tiny"].tensor_specs()}
    assert list(header) == sorted(specs)
    offset = 0
    for name, entry in header.items():
        assert entry["dtype"] == "BF16"
        assert tuple(entry["shape"]) == specs[name].shape
        assert entry["data_offsets"] == [offset, offset + specs[name].nbytes]
        offset += specs[name].nbytes
    assert path.stat().st_size == 8 + int(length) + offset
    assert len(specs) == 2 + 1 + 4 * 9
    assert specs["model.layers.3.self_attn.k_proj.weight"].shape == (128, 256)
    assert specs["model.layers.0.mlp.down_proj.weight"].shape == (256, 688)
    assert specs["lm_head.weight"].shape == (4096, 256)


def test_safetensors_loads_in_torch_with_expected_values(model_dir: Path) -> None:
    torch = pytest.importorskip("torch", reason="safe_open(..., 'pt') needs torch")
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        norm = f.get_tensor("model.layers.1.input_layernorm.weight")
        assert norm.dtype == torch.bfloat16 and bool((norm == 1).all())
        weight = f.get_tensor("model.layers.2.mlp.up_proj.weight").float()
    bound = 0.02 * math.sqrt(3)
    assert weight.shape == (688, 256)
    assert float(weight.abs().max()) <= bound * 1.004  # bf16 rounding of the bound
    assert abs(float(weight.std()) - 0.02) < 0.0005
    assert abs(float(weight.mean())) < 0.0005


def test_bf16_rounds_to_nearest_even() -> None:
    bits = np.array(
        [0x3F800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0x00000000],
        dtype=np.uint32,
    )
    got = safetensors_io.float32_to_bf16(bits.view(np.float32))
    assert got.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F80, 0x3F81, 0xBF80, 0x0000]
    torch = pytest.importorskip("torch", reason="torch is the reference bf16 conversion")
    values = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert (safetensors_io.float32_to_bf16(values) == reference.view(np.uint16)).all()
    assert values.view(np.uint32)[0] != 0  # the input was left alone


def test_safetensors_writer_checks_sizes(tmp_path: Path) -> None:
    spec = safetensors_io.TensorSpec("x", "F32", (2, 3))
    with pytest.raises(ValueError, match="expected 24"):
        safetensors_io.write_safetensors(tmp_path / "x.safetensors", [spec], lambda s: [b"\0"])
    result = safetensors_io.write_safetensors(
        tmp_path / "x.safetensors", [spec], lambda s: [np.arange(6, dtype="<f4").tobytes()]
    )
    data = (tmp_path / "x.safetensors").read_bytes()
    assert result.nbytes == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    shuffled = [safetensors_io.TensorSpec(n, "BF16", (4,)) for n in ("b", "a", "c")]
    assert safetensors_io.header_bytes(shuffled) == safetensors_io.header_bytes(
        sorted(shuffled, key=lambda s: s.name)
    )


def test_corpus_is_pinned_and_varied() -> None:
    lines = corpus.sentences(1000)
    assert lines == corpus.sentences(1000)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert digest == "86295e058ff1d46e6eae30853deafe3d2daa71c3ccab71c32dbe56934289c848"
    assert len(set(corpus.WORDS)) == len(corpus.WORDS) > 300
    text = "\n".join(lines)
    assert all(mark in text for mark in '.,?!;"()') and any(c.isdigit() for c in text)


def test_small_corpus_is_padded_to_the_vocab_size() -> None:
    tok = tiny.train_tokenizer(corpus.sentences(50), vocab_size=1024)
    assert tok.get_vocab_size() == 1024
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("<|im_end|>") == 4
    assert tok.token_to_id("<|reserved_0|>") is not None


def test_tokenizer_training_does_not_depend_on_threads(model_dir: Path) -> None:
    code = (
        "import sys\n"
        "from fastboot.models import corpus, tiny\n"
        "tok = tiny.train_tokenizer(corpus.sentences(tiny.TOKENIZER_CORPUS_LINES))\n"
        "sys.stdout.write(tok.to_str())\n"
    )
    env = os.environ | {"RAYON_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    written = json.loads((model_dir / "tokenizer.json").read_text())
    assert json.loads(single) == written


def test_cli_writes_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-model"
    assert main(["model", "tiny", "--out", str(out), "--size", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert "files: 6" in printed
    assert TINY_WEIGHTS_SHA256 in printed
    total = sum(p.stat().st_size for p in out.iterdir())
    assert f"bytes: {total}" in printed
    assert 10_000_000 < total < 13_000_000


def test_cli_refuses_a_non_empty_dir_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["model", "tiny", "--out", str(out)]) == 1
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="--force"):
        tiny.write_tiny_llama(out)
    assert main(["model", "tiny", "--out", str(out), "--force"]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no staging or old dirs left


def test_empty_dir_is_filled_and_bad_targets_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tiny.write_tiny_llama(empty) == empty
    assert {p.name for p in empty.iterdir()} == EXPECTED_FILES
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        tiny.write_tiny_llama(tmp_path / "file", force=True)
    with pytest.raises(UsageError, match="unknown model size"):
        tiny.write_tiny_llama(tmp_path / "other", "huge")
    with pytest.raises(SystemExit):
        main(["model", "tiny", "--out", str(tmp_path / "other"), "--size", "huge"])


def test_presets_have_the_documented_sizes() -> None:
    assert tiny.PRESETS["tiny"].num_parameters == 4_999_424
    big = tiny.PRESETS["1gib"]
    assert big.num_parameters == 535_869_440
    weight_bytes = len(safetensors_io.header_bytes(big.tensor_specs())) + 2 * big.num_parameters
    assert weight_bytes == 1_071_750_448
    assert abs(weight_bytes / 2**30 - 1) < 0.01
