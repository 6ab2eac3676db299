"""An OpenAI-shaped server that reports which CPU code paths its libraries chose.

For tests/integration/test_cpu_baseline.py: `fastboot serve --fastboot-engine command
--fastboot-cpu-baseline LEVEL -- python tests/servers/cpu_report_server.py --port {port}`
snapshots it; after the restore, GET /cpu answers what the restored process's torch, numpy,
oneDNN and glibc picked. /v1/completions answers deterministic "token ids" computed with torch
(a matrix product seeded by the prompt), so fastboot's oracle has something real to compare.

    python tests/servers/cpu_report_server.py --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from fastboot_patches import cpu_report

#: Asked at start-up, so the snapshot holds a oneDNN that has already chosen.
AT_START = cpu_report.onednn()


def report() -> dict[str, object]:
    return {**cpu_report.report(), "onednn_at_start": list(AT_START)}


def token_ids(prompt: str, count: int) -> list[int]:
    generator = torch.Generator().manual_seed(sum(prompt.encode()) + len(prompt))
    a = torch.randn(count, 64, generator=generator)
    b = torch.randn(64, 4096, generator=generator)
    return [int(i) for i in (a @ b).argmax(dim=1).tolist()]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, body: object) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/cpu":
            self._answer(report())
        else:
            self._answer({"object": "list", "data": [{"id": "cpu-report"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        prompt = str(body.get("prompt") or json.dumps(body.get("messages")))
        ids = token_ids(prompt, int(body.get("max_tokens") or 8))
        choice = {"index": 0, "text": " ".join(map(str, ids)), "token_ids": ids}
        self._answer({"object": "text_completion", "choices": [choice]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    # fastboot stops an engine with SIGTERM; as pid 1 of its namespace this process would
    # ignore it without a handler (the kernel delivers nothing else to a namespace's init).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
