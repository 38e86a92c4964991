"""A stand-in for ``trainer/generation/vllm_server.py`` with no engine behind it, for the tests of
the order in which ``VLLMSampler`` drives sleep, wake and weight loads (tests/trainer/
test_vllm_sleep.py): vLLM's CPU build has no sleep mode, so no real engine here can sleep.

It is started the way the sampler starts the real server (the test passes, as the sampler's
``python``, a script that runs this file with the same arguments), answers its routes with
made-up completions, and records every POST in order; ``GET /calls`` returns them with the
arguments it was started with (``GET /health`` answers as the real one does, in part). It claims
sleep mode (``can_sleep`` in the ready file) when started with ``--sleep-mode``, unless
$GRPO_FAKE_VLLM_CAN_SLEEP is "0" (a platform without it). Standard library only: it runs as a plain script.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TAGS = ("weights", "kv_cache")


class Fake(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, argv: list[str], can_sleep: bool):
        super().__init__(("127.0.0.1", 0), Handler)
        self.argv, self.can_sleep = argv, can_sleep
        self.calls: list[list] = []  # [route, body, what the route saw]
        self.sleeping: set[str] = set()
        self.lock = threading.Lock()

    def answer(self, route: str, body: dict) -> dict:
        seen: dict = {}
        if route == "/generate":
            completion = {"token_ids": [5, 6], "logprobs": [-0.5, -0.25], "finish_reason": "stop"}
            answer = {"completions": [[completion] * int(body.get("n", 1)) for _ in body["prompts"]]}
        elif route in ("/load_weights", "/load_lora"):
            path = Path(body["path"])
            seen["files"] = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            answer = {"seconds": 0.0, "id": 1}
        elif route == "/sleep":
            self.sleeping = set(TAGS)
            answer = {"sleeping": sorted(self.sleeping)}
        elif route == "/wake_up":
            self.sleeping -= set(body.get("tags") or TAGS)
            answer = {"sleeping": sorted(self.sleeping)}
        else:
            answer = {"ok": True}
        seen["sleeping"] = sorted(self.sleeping)  # after the call
        self.calls.append([route, body, seen])
        return answer


class Handler(BaseHTTPRequestHandler):
    server: Fake

    def log_message(self, format: str, *args) -> None:
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        fake = self.server
        with fake.lock:
            if self.path == "/health":
                length = int(fake.argv[fake.argv.index("--max-model-len") + 1])
                self._reply({"ok": True, "max_model_len": length, "can_sleep": fake.can_sleep})
            else:
                self._reply({"argv": fake.argv, "calls": fake.calls})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/shutdown":
            self._reply({"ok": True})
            threading.Thread(target=self.server.shutdown, daemon=True).start()
            return
        with self.server.lock:
            self._reply(self.server.answer(self.path, body))


def exit_with_parent() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


def main() -> None:
    argv = sys.argv[1:]
    ready = argv[argv.index("--ready-file") + 1]
    can_sleep = "--sleep-mode" in argv and os.environ.get("GRPO_FAKE_VLLM_CAN_SLEEP") != "0"
    server = Fake(argv, can_sleep)
    threading.Thread(target=exit_with_parent, daemon=True).start()
    Path(f"{ready}.partial").write_text(
        json.dumps({"port": server.server_address[1], "can_sleep": can_sleep})
    )
    os.replace(f"{ready}.partial", ready)
    server.serve_forever()


if __name__ == "__main__":
    main()
