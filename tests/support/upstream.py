"""A fake Anthropic/OpenAI upstream for end-to-end tests, on a thread of the test process.

Each request is recorded. What it answers is chosen by a `Script` queued with `expect()` or, by
default, a canned JSON reply shaped for the path. SSE scripts can wait on a threading.Event before
each event, so a test can prove that each event reached the client before the next was produced.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


@dataclass
class Script:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # a fixed body (Content-Length framed)
    events: list[bytes] = field(default_factory=list)  # SSE events, sent chunked
    before_event: Callable[[int], None] | None = None  # called before event i is sent
    delay: float = 0.0  # seconds before the response head
    cut_after: int | None = None  # drop the connection after this many events
    event_gap: float = 0.0
    raw: bytes | None = None  # bytes sent as they are in place of a response, then the connection closes


def message_json(text: str = "Hello!", model: str = "claude-sonnet-4-6") -> dict[str, Any]:
    return {
        "id": "msg_fake01",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 3},
    }


def chat_json(text: str = "Hello!") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake01",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def anthropic_stream(deltas: list[str]) -> list[bytes]:
    """The event sequence of a streamed Messages reply whose text is the deltas joined."""
    message = message_json("")
    message["content"] = []
    events = [
        sse("message_start", {"type": "message_start", "message": message}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        sse("ping", {"type": "ping"}),
    ]
    for d in deltas:
        events.append(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta", "text": d}}))
    events += [
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                              "usage": {"output_tokens": len(deltas)}}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return events


def openai_stream(deltas: list[str]) -> list[bytes]:
    chunks = []
    for i, d in enumerate(deltas):
        delta: dict[str, Any] = {"content": d}
        if i == 0:
            delta["role"] = "assistant"
        chunks.append({"id": "chatcmpl-fake01", "object": "chat.completion.chunk", "created": 1700000000,
                       "model": "gpt-4o", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    chunks.append({"id": "chatcmpl-fake01", "object": "chat.completion.chunk", "created": 1700000000,
                   "model": "gpt-4o", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def message_stream(message_id: str, blocks: list[dict[str, Any]], piece: int = 7,
                   usage: dict[str, int] | None = None) -> list[bytes]:
    """A streamed Messages reply of text and tool_use blocks, each streamed in pieces of `piece`
    characters (tool inputs as `input_json_delta`), ending with `tool_use` when it calls a tool."""
    message = message_json("")
    message["id"] = message_id
    message["content"] = []
    message["usage"] = dict(usage or {"input_tokens": 25, "output_tokens": 1})
    events = [sse("message_start", {"type": "message_start", "message": message})]
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            start: dict[str, Any] = {"type": "text", "text": ""}
            field, delta_type, body = "text", "text_delta", block["text"]
        else:
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            field, delta_type, body = "partial_json", "input_json_delta", json.dumps(block["input"])
        events.append(sse("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": start}))
        for i in range(0, len(body), piece):
            events.append(sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                      "delta": {"type": delta_type, field: body[i : i + piece]}}))
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    events += [
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                              "usage": {"output_tokens": sum(len(e) for e in events) // 40}}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return events


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        # Called for each request when no script is queued; returns the script to answer with
        # (None: the canned default). Lets a test play a model that reacts to the conversation.
        self.responder: Callable[[Recorded], Script | None] | None = None
        # Times (monotonic) at which a write to a client failed: the proxy dropped the connection.
        self.aborted: list[float] = []
        self._scripts: list[Script] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                owner._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def expect(self, *scripts: Script) -> None:
        with self._lock:
            self._scripts.extend(scripts)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next_script(self, path: str, recorded: Recorded | None = None) -> Script:
        with self._lock:
            if self._scripts:
                return self._scripts.pop(0)
        if self.responder is not None and recorded is not None:
            script = self.responder(recorded)
            if script is not None:
                return script
        if "chat/completions" in path:
            body = json.dumps(chat_json()).encode()
        elif path.startswith("/v1/models"):
            body = json.dumps({"data": [{"id": "claude-sonnet-4-6", "type": "model"}], "has_more": False}).encode()
        else:
            body = json.dumps(message_json()).encode()
        return Script(body=body, headers={"content-type": "application/json", "request-id": "req_upstream_default"})

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        try:
            self._respond(h)
        except (BrokenPipeError, ConnectionResetError):
            self.aborted.append(time.monotonic())
            h.close_connection = True

    def _respond(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        recorded = Recorded(h.command, h.path, dict(h.headers.items()), body)
        self.requests.append(recorded)
        script = self._next_script(h.path, recorded)
        if script.delay:
            time.sleep(script.delay)
        if script.raw is not None:
            h.wfile.write(script.raw)
            h.wfile.flush()
            h.close_connection = True
            return
        h.send_response(script.status)
        for k, v in script.headers.items():
            h.send_header(k, v)
        if script.body is not None or not script.events:
            data = script.body or b""
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
            return
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        for i, event in enumerate(script.events):
            if script.cut_after is not None and i >= script.cut_after:
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
                return
            if script.before_event is not None:
                script.before_event(i)
            if script.event_gap:
                time.sleep(script.event_gap)
            h.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            h.wfile.flush()
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
