"""A scripted HTTP receiver for forwarded postbacks: a real threaded server on
127.0.0.1 that answers each request from a script and records every hit.

    receiver = Receiver([Step(500), Step(503, {"Retry-After": "1"}), Step(200)]).start()
    ...  # point a campaign's postback_url at receiver.url("/pb?cid={click_id}")
    receiver.wait_for(3, timeout=10)
    [hit.headers["idempotency-key"] for hit in receiver.hits]
    receiver.stop()

A script is a list of steps used in turn (the last one repeats once the list is
used up), or a dict of such lists by request path (``"*"``: any other path), so
several deliveries can go at once, each to its own path. A step may be given as a
bare status code. A hit is recorded when the request's headers are read, before
the step's delay, so a request the client gives up on is still seen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclasses.dataclass(frozen=True)
class Step:
    status: int = 200
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0  # seconds before answering
    body: bytes = b"ok\n"
    # Instead of status and body: what to answer this hit (a fake API that reads the request).
    answer: Callable[[Hit], tuple[int, bytes]] | None = None


@dataclasses.dataclass(frozen=True)
class Hit:
    method: str
    path: str  # without the query
    query: str  # raw, as sent (still percent-encoded)
    headers: dict[str, str]  # names lower-cased
    at: float  # time.monotonic() when the headers were read
    wall: float  # time.time() at the same moment
    status: int  # what it was (or is about to be) answered
    body: bytes = b""  # the request's body (Content-Length bytes)

    @property
    def params(self) -> dict[str, str]:
        """The query decoded, one value per name (blank values kept)."""
        return {k: v[0] for k, v in parse_qs(self.query, keep_blank_values=True).items()}

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")


Script = Sequence[Step | int] | Mapping[str, Sequence[Step | int]]


class Receiver:
    def __init__(self, script: Script = (200,), port: int = 0) -> None:
        self._port = port
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.hits: list[Hit] = []
        self.connections = 0  # TCP connections accepted, a request sent on them or not
        self.in_flight = 0
        self.max_in_flight = 0
        self.set_script(script)

    # -- script ------------------------------------------------------------

    def set_script(self, script: Script) -> None:
        """Replace the script (and restart counting its steps from the first)."""
        scripts = script if isinstance(script, Mapping) else {"*": script}
        with self._lock:
            self._scripts = {
                path: [s if isinstance(s, Step) else Step(s) for s in steps] for path, steps in scripts.items()
            }
            self._used = {path: 0 for path in self._scripts}
            assert all(self._scripts.values()), "every script needs at least one step"

    def _next_step(self, path: str) -> Step:
        name = path if path in self._scripts else "*"
        steps = self._scripts.get(name) or [Step(404)]
        used = self._used.get(name, 0)
        self._used[name] = used + 1
        return steps[min(used, len(steps) - 1)]

    # -- life --------------------------------------------------------------

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                receiver._handle(self)

            do_POST = do_HEAD = do_PUT = do_DELETE = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False  # stop() never waits for a sleeping step

            def process_request(self, request, client_address) -> None:
                with receiver._lock:
                    receiver.connections += 1
                super().process_request(request, client_address)

        self._stopping.clear()
        self._server = Server(("127.0.0.1", self._port), Handler)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (the port is free again) and cut every delayed answer short."""
        self._stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Receiver:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self._port}{path}"

    # -- hits --------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(request.path)
        length = int(request.headers.get("content-length") or 0)
        sent = request.rfile.read(length) if length else b""
        with self._lock:
            step = self._next_step(parts.path)
            hit = Hit(
                request.command,
                parts.path,
                parts.query,
                {k.lower(): v for k, v in request.headers.items()},
                time.monotonic(),
                time.time(),
                step.status,
                sent,
            )
            status, reply = step.answer(hit) if step.answer else (step.status, step.body)
            hit = dataclasses.replace(hit, status=status)
            self.hits.append(hit)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._lock.notify_all()
        try:
            if step.delay and self._stopping.wait(step.delay):
                return  # stopping: drop the connection unanswered
            body = b"" if request.command == "HEAD" else reply
            request.send_response(status)
            for name, value in step.headers.items():
                request.send_header(name, value)
            request.send_header("Content-Length", str(len(body)))
            request.send_header("Connection", "close")
            request.end_headers()
            request.wfile.write(body)
            request.close_connection = True
        except OSError:
            pass  # the client gave up (a timeout): fine, the hit is recorded
        finally:
            with self._lock:
                self.in_flight -= 1

    def hits_to(self, path: str) -> list[Hit]:
        with self._lock:
            return [hit for hit in self.hits if hit.path == path]

    def wait_for(self, count: int, timeout: float = 10.0, path: str | None = None) -> list[Hit]:
        """Block until at least ``count`` hits (to ``path``, if given) arrived;
        AssertionError after ``timeout`` seconds. Returns those hits."""

        def matching() -> list[Hit]:
            return [hit for hit in self.hits if path is None or hit.path == path]

        with self._lock:
            if not self._lock.wait_for(lambda: len(matching()) >= count, timeout):
                raise AssertionError(
                    f"{len(matching())} hits{f' to {path}' if path else ''} within {timeout} s, "
                    f"wanted {count}: {self.hits}"
                )
            return matching()

    async def wait_for_async(self, count: int, timeout: float = 10.0, path: str | None = None) -> list[Hit]:
        """``wait_for`` without blocking the event loop (for an app running in-process)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                hits = [hit for hit in self.hits if path is None or hit.path == path]
            if len(hits) >= count:
                return hits
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(hits)} hits{f' to {path}' if path else ''} within {timeout} s, wanted {count}: {self.hits}"
                )
            await asyncio.sleep(0.01)
