"""A local HTTP server for the tests: files to download, webhooks to receive."""

from __future__ import annotations

import http.server
import json
import threading


class Loopback(http.server.ThreadingHTTPServer):
    """A local HTTP server: GET /files/<name> (or any other path, e.g. a Hub-style `/owner/repo/resolve/...`) serves
    `files[name]` (bytes; without a Content-Length for the names in `unsized`), POST /webhook/<key> records the JSON
    body under `events[key]`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LoopbackHandler)
        self.files: dict[str, bytes] = {}
        self.unsized: set[str] = set()
        self.events: dict[str, list[dict]] = {}
        self.lock = threading.Lock()
        self.base = f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.base}/files/{name}"


class _LoopbackHandler(http.server.BaseHTTPRequestHandler):
    server: Loopback

    def do_GET(self):
        name = self.path.removeprefix("/files/").removeprefix("/")
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        if name in self.server.unsized:
            self.send_header("Connection", "close")  # the body ends when the connection does
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.events.setdefault(self.path.removeprefix("/webhook/"), []).append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass
