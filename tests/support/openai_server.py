"""A local OpenAI-compatible chat server on 127.0.0.1 for tests: scripted replies, recorded requests, and
an optional model list (``GET /v1/models``).

It speaks the real wire format (``POST /v1/chat/completions``), so the real ``openai`` client is
exercised end to end: request shape, status codes, timeouts and malformed bodies.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, host: str = "127.0.0.1"):
        self.requests: list[dict] = []   # {"path", "headers", "body"}
        self.replies: list = []          # str content, or dict(status=..., body=..., delay=...)
        self.default = "a red panda"
        self.models: list[str] | None = None    # GET /v1/models: these names, or 404 when None
        self.model_requests: list[dict] = []     # {"path", "headers"} of each GET
        handler = self._handler()
        self.host = host
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def _next(self):
        return self.replies.pop(0) if self.replies else self.default

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                server.model_requests.append({"path": self.path,
                                              "headers": {k.lower(): v for k, v in self.headers.items()}})
                if self.path.rstrip("/") != "/v1/models" or server.models is None:
                    status, raw = 404, json.dumps({"error": {"message": "not found", "type": "error"}}).encode()
                else:
                    status, raw = 200, json.dumps({"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in server.models]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                        "body": body})
                reply = server._next()
                spec = reply if isinstance(reply, dict) else {"content": reply}
                if spec.get("delay"):
                    time.sleep(spec["delay"])
                status = spec.get("status", 200)
                if "body" in spec:
                    raw = spec["body"].encode()
                    ctype = "text/plain"
                elif status != 200:
                    raw = json.dumps({"error": {"message": spec.get("message", "error"), "type": "error"}}).encode()
                    ctype = "application/json"
                else:
                    raw = json.dumps({
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": spec["content"]}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                    ctype = "application/json"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        return Handler
