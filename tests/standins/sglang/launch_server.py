"""`python -m sglang.launch_server --model-path M --port P --host H [...]`, standing in for
SGLang's server: /health, /v1/models, /v1/completions, /v1/chat/completions and /generate
(greedy `output_ids` derived from the prompt). /boot says which process start this is, so a
test can tell a restored process from a new one; it also records the argv it was given."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BOOT = secrets.token_hex(8)  # chosen once per process start: a restore keeps it


def output_ids(prompt: str, n: int) -> list[int]:
    seed = zlib.crc32(prompt.encode())
    return [(seed >> (i % 24)) % 32000 for i in range(n)]


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, body: object, code: int = 200) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer({})
        elif self.path == "/v1/models":
            self._answer({"data": [{"id": self.server.model, "object": "model"}]})
        elif self.path == "/boot":
            self._answer({"boot": BOOT, "argv": sys.argv[1:], "pid": os.getpid()})
        else:
            self._answer({"error": "not found"}, 404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        if self.path == "/generate":
            n = int(body["sampling_params"]["max_new_tokens"])
            self._answer({"text": "x" * n, "output_ids": output_ids(body["text"], n)})
        elif self.path == "/v1/completions":
            if "return_token_ids" in body:  # SGLang's schema has no such field
                self._answer({"error": "unexpected field return_token_ids"}, 400)
                return
            ids = output_ids(body["prompt"], int(body.get("max_tokens", 16)))
            self._answer(
                {
                    "object": "text_completion",
                    "model": self.server.model,
                    "choices": [
                        {"index": 0, "text": " ".join(map(str, ids)), "finish_reason": "length"}
                    ],
                }
            )
        elif self.path == "/v1/chat/completions":
            self._answer(
                {
                    "object": "chat.completion",
                    "model": self.server.model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "length",
                            "message": {"role": "assistant", "content": "hi"},
                        }
                    ],
                }
            )
        else:
            self._answer({"error": "not found"}, 404)


class Server(ThreadingHTTPServer):
    model: str


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name")
    args, _ = parser.parse_known_args()
    # fastboot stops an engine with SIGTERM to its pid 1 (the pid namespace's init, which gets
    # only the signals it handles), as SGLang's own server handles it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    server = Server((args.host, args.port), Handler)
    server.model = args.served_model_name or args.model_path
    print(f"stand-in sglang serving {server.model} on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
