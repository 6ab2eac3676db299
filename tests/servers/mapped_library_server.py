"""An OpenAI-shaped server whose answers come from a shared library it maps at start-up.

For tests/integration/test_mapped_files.py: the library's path comes from $MAPPED_LIBRARY, not
the command line, so fastboot's snapshot key does not hold its content; what stops a restore
from running the snapshot's memory against a rebuilt library at that path is CRIU's check of
each mapped ELF file's build-id at restore (then fastboot cold boots).

    MAPPED_LIBRARY=/path/libanswer.so python tests/servers/mapped_library_server.py --port 8000

The library exports `int answer(int)`; a completion's "token ids" are answer(i) for i < max_tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LIBRARY = ctypes.CDLL(os.environ["MAPPED_LIBRARY"])
LIBRARY.answer.argtypes = [ctypes.c_int]
LIBRARY.answer.restype = ctypes.c_int


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
        self._answer({"object": "list", "data": [{"id": "mapped-library"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        ids = [LIBRARY.answer(i) for i in range(int(body.get("max_tokens") or 8))]
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
