"""A small OpenAI-compatible server over transformers on torch, for tests/gpu/serve_gpu.sh.

The lent GPU machines have torch and transformers but no vLLM and no FastAPI, so the server that
`fastboot serve --fastboot-engine command` snapshots there is this one, on the standard library's
HTTP server: /health, /v1/models, greedy /v1/completions (with the generated `token_ids`, so the
oracle compares ids) and /v1/chat/completions. With --compile the model's forward runs under
`torch.compile(mode="reduce-overhead")` with a static KV cache: CUDA graphs are captured on the
first requests of each shape (fastboot's warm-up), which is the work a restore saves.

    python tests/gpu/gpu_server.py --model DIR --host 127.0.0.1 --port 8000 [--device cuda]
        [--compile]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import transformers


class Model:
    """The model and tokenizer, one generation at a time."""

    def __init__(self, path: str, device: str, compile_graphs: bool) -> None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.name = path
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.to(device).eval()
        self.device = device
        self.compiled = compile_graphs
        if compile_graphs:
            self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead")
        self.lock = threading.Lock()

    def generate(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids], device=self.device)
        extra: dict[str, Any] = {"cache_implementation": "static"} if self.compiled else {}
        with self.lock, torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                **extra,
            )
        return [int(t) for t in out[0, len(prompt_ids) :].tolist()]


def handler_for(model: Model) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, code: int, body: object) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"status": "ok", "cuda_graphs": model.compiled})
            elif self.path == "/v1/models":
                self._answer(200, {"object": "list", "data": [{"id": model.name}]})
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            max_tokens = int(body.get("max_tokens") or 16)
            if self.path == "/v1/completions":
                prompt_ids = model.tokenizer(str(body.get("prompt", "")))["input_ids"]
                ids = model.generate(prompt_ids, max_tokens)
                choice = {"index": 0, "text": model.tokenizer.decode(ids), "token_ids": ids}
                kind = "text_completion"
            elif self.path == "/v1/chat/completions":
                text = model.tokenizer.apply_chat_template(
                    body.get("messages", []), add_generation_prompt=True, tokenize=False
                )
                ids = model.generate(model.tokenizer(text)["input_ids"], max_tokens)
                message = {"role": "assistant", "content": model.tokenizer.decode(ids)}
                choice = {"index": 0, "message": message, "token_ids": ids}
                kind = "chat.completion"
            else:
                self._answer(404, {"error": "not found"})
                return
            choice["finish_reason"] = "length"
            self._answer(
                200,
                {
                    "object": kind,
                    "created": int(time.time()),
                    "model": model.name,
                    "choices": [choice],
                },
            )

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="CUDA graphs (reduce-overhead)")
    args = parser.parse_args()
    model = Model(args.model, args.device, args.compile)
    server = ThreadingHTTPServer((args.host, args.port), handler_for(model))
    print(f"gpu_server: {args.model} on {args.device} at {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
