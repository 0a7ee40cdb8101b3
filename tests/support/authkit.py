"""Helpers for the auth tests: configs, request contexts, signed tokens, a fake introspection endpoint."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from twisted.internet import defer

from ccproxy.config import Config, parse
from ccproxy.context import Layer, RequestContext
from ccproxy.routes import route
from tests.support.requests import FakeRequest

UPSTREAM_KEYS = {"anthropic": "sk-ant-upstream-key-0000000000009f3a", "openai": "sk-proj-upstream-00000000000077aa"}


def config(auth: dict[str, Any], api_keys: dict[str, Any] | None = None, upstream_keys: bool = True,
           base_dir: str = ".") -> Config:
    security: dict[str, Any] = {"auth": auth}
    if api_keys is not None:
        security["api_keys"] = api_keys
    ups: dict[str, Any] = {}
    if upstream_keys:
        ups = {name: {"api_key": key} for name, key in UPSTREAM_KEYS.items()}
    return parse({"server": {"tls": {"enabled": False}}, "upstreams": ups, "security": security},
                 base_dir=base_dir, environ={})


def context(headers: dict[str, str] | None = None, client_ip: str = "127.0.0.1",
            path: bytes = b"/v1/messages", cfg: Config | None = None) -> RequestContext:
    request = FakeRequest(b"POST", path, {name.encode(): [value.encode()] for name, value in (headers or {}).items()},
                          client=client_ip)
    upstreams = (cfg or config({"enabled": False})).upstreams
    return RequestContext(request=request, request_id="req_test", route=route(path, upstreams),
                          client_ip=client_ip, started=0.0, body=b"{}", method=b"POST", path=path,
                          headers=request.request_headers.copy())


def run(layer: Layer, ctx: RequestContext) -> Any:
    """Run `layer.check(ctx)` to completion; return None, or the exception it raised."""
    d = defer.ensureDeferred(layer.check(ctx))
    out: list[Any] = []
    d.addCallbacks(out.append, lambda f: out.append(f.value))
    assert out, "check did not finish"
    return out[0]


class Events:
    """Collects ccproxy security events."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("ccproxy_event"):
            self.seen.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["ccproxy_event"] == name]


class FakeIntrospection:
    """An RFC 7662 endpoint on a thread: `answer(token) -> (status, json)`; `delay` seconds first."""

    def __init__(self, answer: Callable[[str], tuple[int, Any]]) -> None:
        self.answer = answer
        self.delay = 0.0
        self.calls: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from urllib.parse import parse_qs

                length = int(self.headers.get("content-length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                fake.calls.append({"authorization": self.headers.get("authorization", ""), **form})
                if fake.delay:
                    time.sleep(fake.delay)
                status, body = fake.answer(form.get("token", ""))
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/introspect"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
