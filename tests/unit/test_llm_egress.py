"""Attacks on the LLM calls' outgoing HTTP and on the page's model-list route (anyone reaching ComfyUI's port may
call it; any shared workflow names an endpoint): each test performs the attack against real local listeners.

- a DNS name that resolves to a metadata address (the URL check only sees the name), also when the answer
  changes between calls (rebinding): refused when connecting, nothing sent;
- a redirect to another host: never followed, that host gets nothing (nor the key);
- an oversized reply, a gzip bomb, a reply dripped a byte at a time: refused / cut at the overall deadline;
- the route: a huge body or deeply nested JSON is refused without parsing it on the event loop.
"""

import asyncio
import gzip
import importlib
import json
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dynasyn import llm
from dynasyn.egress import MAX_REPLY_BYTES, forbidden_address
from dynasyn.llm import LLMError, chat, list_models, offered_models
from tests.support.openai_server import FakeOpenAI

SECRET = "sk-operator-secret-egress-42"
LLM_ENV = ("DYNASYN_API_KEY", "OPENAI_API_KEY", "DYNASYN_API_HOSTS", "DYNASYN_API_BASE", "DYNASYN_ENDPOINT_HOSTS")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in LLM_ENV:
        monkeypatch.delenv(var, raising=False)


class RawServer(FakeOpenAI):
    """A listener whose GET handler the test writes (``handle(handler)``); records every request's path and headers.
    Starting and stopping it is FakeOpenAI's."""

    def __init__(self, handle, host="127.0.0.1"):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                outer.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
                try:
                    handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what the test wants

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.do_GET()

        self.host = host
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


def _reply(handler, body: bytes, headers=(), status=200):
    handler.send_response(status)
    for k, v in headers:
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _fake_dns(monkeypatch, answers: dict):
    """The attacker's DNS: ``answers[name]`` is a list of address lists, one per lookup (the last one repeats)."""
    real = socket.getaddrinfo
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        seq = answers[host]
        addresses = seq[min(sum(1 for h in lookups if h == host), len(seq) - 1)]
        lookups.append(host)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_every_encoding_of_a_metadata_address_is_forbidden():
    import ipaddress

    for a in ("169.254.169.254", "::ffff:169.254.169.254", "fe80::1", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe",
              "fd00:ec2::254", "100.100.100.200", "0.0.0.0", "::", "224.0.0.1"):
        assert forbidden_address(ipaddress.ip_address(a)), a
    for a in ("127.0.0.1", "10.0.0.5", "192.168.1.2", "::1", "8.8.8.8"):
        assert not forbidden_address(ipaddress.ip_address(a)), a  # local LLM servers stay reachable
    assert llm.validate_base_url("http://[::1]:11434/v1") == "http://[::1]:11434/v1"
    for url in ("http://2852039166/v1", "http://0251.0376.0251.0376/v1", "http://0xa9fea9fe/v1",
                "http://[::ffff:a9fe:a9fe]/v1", "http://[2002:a9fe:a9fe::]/v1", "http://100.100.100.200/v1"):
        with pytest.raises(LLMError, match="link-local / metadata"):
            llm.validate_base_url(url)


def test_a_name_that_resolves_to_a_metadata_address_is_never_connected(monkeypatch):
    """The URL check sees only a name; the address is checked when connecting, and the connection goes to the
    address that was checked (a second lookup could answer differently: DNS rebinding)."""
    with FakeOpenAI(host="127.0.0.2") as listener:
        listener.models = ["m"]
        port = listener.httpd.server_address[1]
        lookups = _fake_dns(monkeypatch, {
            "metadata.attacker.test": [["169.254.169.254"]],
            "mixed.attacker.test": [["127.0.0.2", "169.254.169.254"]],
            "mapped.attacker.test": [["::ffff:169.254.169.254"]],
            "rebind.attacker.test": [["127.0.0.2"], ["169.254.169.254"]],
        })
        for name in ("metadata", "mixed", "mapped"):
            with pytest.raises(LLMError, match="resolves to a link-local / metadata"):
                offered_models(f"http://{name}.attacker.test:{port}/v1", timeout=2.0)
        with pytest.raises(LLMError, match="resolves to a link-local / metadata"):
            chat(f"http://metadata.attacker.test:{port}/v1", "m", [{"role": "user", "content": "hi"}], seed=0,
                 api_key=None, timeout=2.0)
        assert listener.model_requests == [] and listener.requests == []
        # rebinding: the first lookup answers the listener, the next one the metadata address
        assert offered_models(f"http://rebind.attacker.test:{port}/v1", timeout=2.0) == ["m"]
        with pytest.raises(LLMError, match="resolves to a link-local / metadata"):
            offered_models(f"http://rebind.attacker.test:{port}/v1", timeout=2.0)
        assert len(listener.model_requests) == 1 and lookups.count("rebind.attacker.test") == 2
    with FakeOpenAI() as local:  # localhost resolves to ::1 (nobody there) and 127.0.0.1: still reached
        local.models = ["llava"]
        assert offered_models(f"http://localhost:{local.httpd.server_address[1]}/v1", timeout=5.0) == ["llava"]


def test_a_redirect_is_never_followed_and_the_key_goes_nowhere_else(monkeypatch):
    """A host the operator named (it gets the key) answers with a redirect to another host: not followed."""
    monkeypatch.setenv("DYNASYN_API_KEY", SECRET)
    with FakeOpenAI() as target:
        target.models = ["internal-secret-model"]

        def redirect(h):
            h.send_response(302)
            h.send_header("Location", f"{target.base_url}/models")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with RawServer(redirect, host="127.0.0.2") as named:
            monkeypatch.setenv("DYNASYN_API_HOSTS", f"127.0.0.2:{named.httpd.server_address[1]}")
            assert offered_models(named.base_url, timeout=5.0) is None
            assert named.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
        assert target.model_requests == []


def test_an_oversized_or_compressed_reply_is_not_read(monkeypatch):
    """A model list larger than the cap, and a gzip bomb (a small body that inflates past the cap), are refused
    instead of being read into the server's memory."""
    names = json.dumps({"object": "list", "data": [{"id": f"m{i:07d}", "object": "model"} for i in range(130_000)]})
    big = names.encode()
    assert len(big) > MAX_REPLY_BYTES
    with RawServer(lambda h: _reply(h, big, [("Content-Type", "application/json")])) as huge:
        with pytest.raises(LLMError, match="larger than"):
            offered_models(huge.base_url, timeout=10.0)
    bomb = gzip.compress(b'{"object": "list", "data": [{"id": "m"}]' + b" " * (8 << 20) + b"}", compresslevel=1)
    assert len(bomb) < 64 << 10
    with RawServer(lambda h: _reply(h, bomb, [("Content-Type", "application/json"),
                                              ("Content-Encoding", "gzip")])) as gz:
        with pytest.raises(LLMError, match="compressed"):
            offered_models(gz.base_url, timeout=10.0)
        assert gz.requests[0]["headers"]["accept-encoding"] == "identity"


def test_a_reply_dripped_a_byte_at_a_time_ends_at_the_deadline():
    """httpx's timeouts are per read: a server sending a byte every 0.3 s never trips a 1 s timeout. The overall
    deadline ends the call anyway (here at 1 s, instead of the 6 s the drip would take)."""
    body = b'{"data": [{"id": "m"}]}'

    def drip(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for b in body:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.3)

    with RawServer(drip) as slow:
        start = time.monotonic()
        assert list_models(slow.base_url, None, timeout=1.0) is None
        assert time.monotonic() - start < 2.5
        start = time.monotonic()
        with pytest.raises(LLMError, match="did not answer within"):
            chat(slow.base_url.replace("/v1", "/v1/x"), "m", [{"role": "user", "content": "hi"}], seed=0,
                 api_key=None, timeout=1.0)
        assert time.monotonic() - start < 2.5


# ------------------------------------------------------------------------------------------------ the route
def _routes_module():
    """nodes/routes.py imported as ComfyUI would (inside the pack's package), without ComfyUI or the pack's nodes."""
    name = "dynasyn_route_test_pack"
    if name not in sys.modules:
        pack = types.ModuleType(name)
        pack.__path__ = [str(ROOT)]
        sys.modules[name] = pack
    return importlib.import_module(f"{name}.nodes.routes")


@pytest.fixture()
def route_url():
    """The route on a real aiohttp server with ComfyUI's body limit (100 MB by default)."""
    from aiohttp import web

    routes = _routes_module()
    ready, box = threading.Event(), {}

    def serve():
        loop = asyncio.new_event_loop()
        box["loop"] = loop
        app = web.Application(client_max_size=100 * 1024 * 1024)
        app.router.add_post(routes.MODELS_ROUTE, routes.llm_models)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        box["port"] = site._server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{box['port']}{routes.MODELS_ROUTE}"
    box["loop"].call_soon_threadsafe(box["loop"].stop)
    thread.join(10)


def _post(url, raw: bytes):
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_the_route_refuses_huge_and_deeply_nested_bodies(route_url):
    with FakeOpenAI(host="127.0.0.2") as listener:
        listener.models = ["m"]
        status, body = _post(route_url, json.dumps({"endpoint": listener.base_url}).encode())
        assert status == 200 and body == {"models": ["m"], "offered": True}
        # 2 MB of JSON (ComfyUI accepts 100 MB): refused unread, nothing sent
        padded = json.dumps({"endpoint": listener.base_url, "pad": "x" * (2 << 20)}).encode()
        status, body = _post(route_url, padded)
        assert status == 413 and "larger than" in body["error"]
        # nesting deep enough to break the JSON parser's recursion, in a small body: a clear 400, not a 500
        status, body = _post(route_url, b"[" * 4000 + b"]" * 4000)
        assert status == 400 and "endpoint" in body["error"]
        assert len(listener.model_requests) == 1


def test_errors_anyone_reads_do_not_show_the_servers_home_folder(monkeypatch, tmp_path):
    """The route answers LLMError messages to any caller (and node errors land in /history): the key file's
    path is shown from ``~``, never with the server's home folder (its user name)."""
    monkeypatch.setenv("DYNASYN_API_HOSTS", "127.0.0.2:1")
    monkeypatch.setattr("pathlib.Path.home", classmethod(lambda cls: tmp_path / "home" / "operator-name"))
    monkeypatch.setattr(llm, "DEFAULT_KEY_FILE", tmp_path / "home" / "operator-name" / ".config" / "dynasyn" / "api_key")
    for url in ("http://127.0.0.2:1/v1", "http://user:pw@127.0.0.2:1/v1"):
        with pytest.raises(LLMError) as e:
            offered_models(url)
        assert "~/.config/dynasyn/api_key" in str(e.value) and "operator-name" not in str(e.value)
