"""trainer.net.post_json against real local HTTP servers: the deadline of a whole attempt and the
cap on an answer's size."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainer import net
from trainer.config import OperatorPolicy
from trainer.rewards import RewardSuite

LOCAL = ["127.0.0.1"]  # the test server listens on loopback


class DrippingHandler(BaseHTTPRequestHandler):
    """/drip-body: 200 and headers at once, then one byte of body every 0.3 s (60 in all);
    /drip-headers: the status line and headers a byte every 0.3 s; /huge: a body larger than the
    cap, with a Content-Length (/huge-chunked: without one); /ok: a small JSON answer."""

    body_bytes_sent: list[int] = []
    finished: list[str] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        sent = 0
        try:
            if self.path == "/drip-body":
                self.send_response(200)
                self.send_header("Content-Length", "60")
                self.end_headers()
                for _ in range(60):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    sent += 1
                    time.sleep(0.3)
            elif self.path == "/drip-headers":
                for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * 60 + b"\r\nContent-Length: 0\r\n\r\n":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.3)
            elif self.path in ("/huge", "/huge-chunked"):
                self.send_response(200)
                if self.path == "/huge":
                    self.send_header("Content-Length", str(64 * 1024 * 1024))
                self.end_headers()
                for _ in range(64 * 16):  # 64 MiB in 64 KiB pieces, unless the client hangs up
                    self.wfile.write(b"0" * 65536)
                    sent += 65536
            else:
                payload = json.dumps({"rewards": [1.0]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            self.finished.append(self.path)
        except OSError:
            pass  # the client hung up
        finally:
            self.body_bytes_sent.append(sent)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    DrippingHandler.body_bytes_sent = []
    DrippingHandler.finished = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), DrippingHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def wait_for_handler(count: int = 1) -> None:
    for _ in range(200):
        if len(DrippingHandler.body_bytes_sent) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the handler never finished")


def test_an_answer_dripped_a_byte_at_a_time_fails_at_the_deadline(server):
    with pytest.raises(
        net.OutboundError, match=r"no answer within 1 s \(the deadline for the whole answer\)"
    ):
        net.post_json(f"{server}/drip-body", {"a": 1}, allowed_hosts=LOCAL, timeout_s=1.0, retries=0)
    wait_for_handler()
    # Each byte came well within the 1 s per-read timeout; the client hung up after a few of 60.
    assert "/drip-body" not in DrippingHandler.finished
    assert DrippingHandler.body_bytes_sent[0] < 20


def test_headers_dripped_a_byte_at_a_time_fail_at_the_deadline(server):
    with pytest.raises(
        net.OutboundError, match=r"no answer within 1 s \(the deadline for the whole answer\)"
    ):
        net.post_json(f"{server}/drip-headers", {"a": 1}, allowed_hosts=LOCAL, timeout_s=1.0, retries=0)
    wait_for_handler()
    assert "/drip-headers" not in DrippingHandler.finished


def test_the_deadline_holds_for_an_http_reward_with_its_own_client(server):
    spec = {"type": "http", "url": f"{server}/drip-body", "timeout_s": 1.0, "retries": 0}
    with RewardSuite([spec], policy=OperatorPolicy(allow_private_hosts=tuple(LOCAL))) as suite:
        output = suite([""], ["a"], [{}])
    assert output.errors == {"http": 1}
    assert "no answer within 1 s (the deadline for the whole answer)" in output.error_messages[0]


@pytest.mark.parametrize("path", ["/huge", "/huge-chunked"])
def test_an_answer_over_the_cap_fails_naming_the_cap_without_being_read_whole(server, path):
    limit = 1024 * 1024
    with pytest.raises(net.OutboundError, match=f"the answer is larger than the limit of {limit} bytes"):
        net.post_json(
            f"{server}{path}",
            {"a": 1},
            allowed_hosts=LOCAL,
            timeout_s=30.0,
            retries=0,
            max_answer_bytes=limit,
        )
    wait_for_handler()
    assert path not in DrippingHandler.finished  # the client hung up long before the 64 MiB were sent


def test_the_default_cap_fits_a_large_batch_of_rewards_and_refuses_more():
    rewards = json.dumps({"rewards": [0.123456789012345] * 100_000}).encode()
    assert len(rewards) < net.MAX_ANSWER_BYTES // 4  # 100,000 rewards fit with room to spare
    assert net.MAX_ANSWER_BYTES <= 16 * 1024 * 1024


def test_a_small_answer_within_the_deadline_and_cap_is_returned_whole(server):
    response = net.post_json(f"{server}/ok", {"a": 1}, allowed_hosts=LOCAL, timeout_s=5.0, retries=0)
    assert response.status_code == 200 and response.json() == {"rewards": [1.0]}
