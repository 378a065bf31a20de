"""A live S3 server for the tests (moto's, over HTTP on 127.0.0.1) and a fault-injecting proxy.

The server is real: s3fs talks to it over TCP exactly as to S3 or MinIO. The proxy is a small
real HTTP server in front of it that forwards every request, and on demand answers some with
a server error (500, 503, throttling) or drops the connection without an answer, as an
overloaded or failing endpoint would. That is fault injection, used only for faults a local
server cannot be made to produce on cue; stopping the server itself is done for real.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import re
import socket
import threading
from typing import Any, Callable, List, Optional, Tuple

ACCESS_KEY = "AKIAASYNCCKPTTESTKEY7"
SECRET_KEY = "asyncckpt-SECRET-access-key-value-Q9x"
SESSION_TOKEN = "asyncckpt-SESSION-token-value-Z3w"
SECRETS = (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server on 127.0.0.1; can be stopped and started again on the same port.

    moto keeps its buckets in this process, so they survive a restart (like a real server's disk).
    """

    def __init__(self, port: Optional[int] = None) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._cls = ThreadedMotoServer
        self.port = port or free_port()
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


Rule = Callable[["Request"], Optional[str]]


class Request:
    """What the proxy saw: method, path with query, and the S3 operation it is."""

    def __init__(self, method: str, path: str, headers: Any) -> None:
        self.method = method
        self.path = path
        self.headers = headers

    @property
    def operation(self) -> str:
        query = self.path.partition("?")[2]
        if self.method == "PUT" and "partNumber=" in query:
            return "UploadPart"
        if self.method == "POST" and "uploads" in query.split("&"):
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId=" in query:
            return "CompleteMultipartUpload"
        if self.method == "DELETE" and "uploadId=" in query:
            return "AbortMultipartUpload"
        if self.method == "PUT":
            return "PutObject"
        return f"{self.method}"

    def __repr__(self) -> str:
        return f"{self.operation} {self.path}"


_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle the request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}


class FaultProxy:
    """Forwards HTTP requests to ``upstream``; ``rule(request)`` may answer ``"500"``, ``"503"``,
    ``"slowdown"``, ``"bad-key"`` (a 403 whose message echoes the access key, as some servers
    do), ``"drop"`` (close the connection unanswered) instead of forwarding, or ``"lost-reply"``
    (forward, then close the connection before the answer)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.rule: Optional[Rule] = None
        self.seen: List[Request] = []
        self.injected: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(self.command, self.path, self.headers)
                with proxy._lock:
                    proxy.seen.append(request)
                    action = proxy.rule(request) if proxy.rule is not None else None
                    if action:
                        proxy.injected.append((request.operation, action))
                lost_reply = action == "lost-reply"  # forward, then drop the connection before the answer
                if action in ("forward", "lost-reply"):  # "forward": the rule only wanted its side effect
                    action = None
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "bad-key":
                    match = re.search(r"Credential=([^/]+)/", self.headers.get("Authorization", ""))
                    key = match.group(1) if match else "?"
                    self._reply_error(403, "InvalidAccessKeyId", f"The AWS Access Key Id {key} does not exist")
                    return
                if action in _ERRORS:
                    self._reply_error(*_ERRORS[action])
                    return
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                except OSError:  # the server behind the proxy is down: the client sees a dropped connection
                    lost_reply = True
                if lost_reply:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _reply_error(self, status: int, code: str, message: str) -> None:
                data = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>injected</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, operation: str, action: str, times: int = 1 << 30, after: int = 0,
             then: Optional[Callable[[], None]] = None) -> None:
        """Answer ``action`` to the ``operation`` requests after the first ``after`` of them,
        ``times`` times; ``then()`` runs (once) just before the first injected answer."""
        state = {"count": 0, "done": 0, "ran": False}

        def rule(request: Request) -> Optional[str]:
            if request.operation != operation:
                return None
            state["count"] += 1
            if state["count"] <= after or state["done"] >= times:
                return None
            state["done"] += 1
            if then is not None and not state["ran"]:
                state["ran"] = True
                then()
            return action

        self.rule = rule

    def clear(self) -> None:
        self.rule = None
        with self._lock:
            self.seen.clear()
            self.injected.clear()

    def count(self, operation: str) -> int:
        with self._lock:
            return sum(1 for r in self.seen if r.operation == operation)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
