"""An upstream that answers with scripted raw bytes on persistent connections, and counts them.

Each request read (head, and a Content-Length body) takes the next reply from the script: bytes
sent as they are, then optionally more bytes `later` seconds afterwards on the same connection (the
connection is idle by then), and optionally a close.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class Reply:
    data: bytes
    later: bytes = b""  # sent after `delay` seconds, unasked, on the now idle connection
    delay: float = 0.2
    close: bool = False


class RawUpstream:
    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for conn in list(self._open):
            try:
                conn.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                with self._lock:
                    self.requests.append(head)
                    reply = self.replies.pop(0) if self.replies else Reply(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                conn.sendall(reply.data)
                if reply.later:
                    time.sleep(reply.delay)
                    conn.sendall(reply.later)
                if reply.close:
                    return
        except OSError:
            return
        finally:
            conn.close()
