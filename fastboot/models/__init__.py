"""Local test models: deterministic random-weight checkpoints that load like real ones.

`tiny.write_tiny_llama` writes a Llama (`tiny` or `1gib` preset) with bf16 safetensors weights
(`safetensors_io`) and a byte-level BPE tokenizer trained on generated text (`corpus`). Nothing is
downloaded; the weights are the same bytes everywhere. The CLI is `fastboot model tiny`.
"""
