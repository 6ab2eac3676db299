"""The main job: `fastboot serve` on the built-in tiny model, cold then restored.

Run 1 boots vLLM cold, warms it up, snapshots it and serves the restored engine; run 2 restores
the snapshot. Each is timed from process start to its first answered chat request, and both
times are printed. Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from fastboot.models.tiny import cpu_serve_flags
from fastboot.serve import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".cache" / "models" / "tiny"
SNAPSHOTS = ROOT / ".cache" / "snapshots"
FLAGS = cpu_serve_flags("tiny")


def chat_once(port: int, proc: subprocess.Popen[bytes], deadline_s: float) -> str:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", timeout=60)
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"fastboot serve exited with {proc.returncode}")
        try:
            reply = client.chat.completions.create(
                model=str(MODEL),
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8,
                temperature=0,
            )
            return reply.choices[0].message.content or ""
        except (openai.APIConnectionError, openai.NotFoundError):
            if time.monotonic() - start > deadline_s:
                raise SystemExit(f"no answer within {deadline_s:.0f} s") from None
            time.sleep(0.2)


def wait_for_log(
    log: Path, needles: tuple[str, ...], proc: subprocess.Popen[bytes], deadline_s: float
) -> None:
    start = time.monotonic()
    while not any(n in log.read_text(errors="replace") for n in needles):
        if proc.poll() is not None or time.monotonic() - start > deadline_s:
            raise SystemExit(f"fastboot serve did not get to {needles[0]!r}; see {log}")
        time.sleep(0.2)


def run(name: str, port: int, log: Path, *extra: str) -> float:
    argv = [
        str(ROOT / ".venv" / "bin" / "fastboot"),
        "serve",
        str(MODEL),
        "--port",
        str(port),
        *FLAGS,
        "--fastboot-snapshot-dir",
        str(SNAPSHOTS),
        *extra,
    ]
    print(f"$ {' '.join(argv[1:])}   # {name}, output in {log}", flush=True)
    with log.open("wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            text = chat_once(port, proc, 900)
            elapsed = time.monotonic() - start
            # A first run answers from its cold engine while it warms up and snapshots: let it
            # finish (it then serves the restored engine) before stopping it.
            wait_for_log(log, ("restored snapshot", "serving without a snapshot"), proc, 600)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    for line in log.read_text(errors="replace").splitlines():
        if " fastboot " in line and ("snapshot" in line or "cold boot" in line):
            print("   ", line)
    print(f"    first chat answer after {elapsed:.1f} s: {text!r}\n", flush=True)
    return elapsed


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    port = free_port()
    logs = ROOT / ".cache" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # --fastboot-refresh: run 1 is a real cold boot even if an earlier demo left a snapshot.
    cold = run("run 1: cold boot + snapshot", port, logs / "demo-cold.log", "--fastboot-refresh")
    restored = run("run 2: restore", port, logs / "demo-restore.log")
    print(f"cold boot to first answer: {cold:6.1f} s")
    print(f"restore to first answer:   {restored:6.1f} s   ({cold / restored:.0f}x faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
