"""A webhook receiver: a real HTTP server in the test's process that records each request and answers as
the test says."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()


class Receiver:
    """A real HTTP server (on loopback unless ``host`` names another address) that records what it receives
    and answers as the test says: ``answer(n, request)`` gives the n-th request's (status, headers, body,
    seconds to wait first)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.received: list[Received] = []
        self.answer: Callable[[int, Received], tuple[int, dict[str, str], bytes, float]] = lambda n, request: (
            200,
            {},
            b"",
            0.0,
        )
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                request = Received(self.path, dict(self.headers), self.rfile.read(length), time.monotonic())
                with lock:
                    receiver.received.append(request)
                    n = len(receiver.received) - 1
                status, headers, body, wait = receiver.answer(n, request)
                time.sleep(wait)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = handle_one

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that gave up on a slow answer (as the tests make it) is not an error here

        lock = threading.Lock()
        self.host = host
        self.server = Server((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
