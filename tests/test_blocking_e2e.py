"""Automatic blocking that holds: HTTP-layer refusals count, the threshold is exact, and a block
closes the address's open connections."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from tests.support.daemon import Daemon
from tests.test_incident_e2e import BLOCKED_SOURCE, assert_closed, connect, post, status_from, wait_for


def malformed(d: Daemon) -> bytes | str:
    """One request with a broken head, on its own connection from BLOCKED_SOURCE."""
    try:
        with socket.create_connection((d.host, d.port), timeout=5, source_address=(BLOCKED_SOURCE, 0)) as s:
            tls = d.ssl_context().wrap_socket(s, server_hostname="localhost")
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
            out = b""
            while chunk := tls.recv(65536):
                out += chunk
            return out[:12]
    except (OSError, ssl.SSLError):
        return "refused"


def auto_block(threshold: int) -> dict[str, Any]:
    return {"security": {"ip_blacklist": {"enabled": False, "auto_block": {
        "enabled": True, "threshold": threshold, "duration": "1h"}}}}


def test_malformed_requests_end_in_a_block(daemon: Any) -> None:
    d = daemon(auto_block(20))
    answers = [malformed(d) for _ in range(150)]
    assert answers[:20] == [b"HTTP/1.1 400"] * 20
    # The 21st in a minute blocks: it may still get its 400 (counted as it is refused), then nothing.
    assert answers[21:] == ["refused"] * 129
    assert status_from(d) == "refused"
    assert "ip_auto_blocked ip_address=127.0.0.2" in d.log()
    assert status_from(d, source="127.0.0.1") == 200


def test_the_request_over_the_threshold_blocks_and_closes_open_connections(daemon: Any) -> None:
    d = daemon(auto_block(10))
    kept = connect(d)
    assert post(kept)[0] == 200  # 1
    flood = connect(d)
    codes = [post(flood)[0] for _ in range(9)]  # 2..10
    assert codes == [200] * 9
    assert post(flood)[0] == 429  # the 11th in a minute: blocked
    # The other kept-alive connection of that address is closed too, within a second or so.
    assert_closed(kept)
    wait_for(lambda: status_from(d) == "refused", 1.0)


def test_a_block_closes_connections_behind_a_proxy_protocol_balancer(daemon: Any) -> None:
    from tests.support.admin import security
    from tests.test_network_e2e import get, refused, tcp

    d = daemon()
    config = d.config
    config["server"].update({"proxy_protocol": True, "trusted_proxies": ["127.0.0.0/8"]})
    assert "config reloaded" in d.reload(config)

    def raw(client: str) -> socket.socket:
        s = tcp(d)
        s.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 {d.port}\r\n".encode())
        return s

    def via_balancer(client: str) -> ssl.SSLSocket:
        return d.ssl_context().wrap_socket(raw(client), server_hostname="localhost")

    kept, other = via_balancer("203.0.113.8"), via_balancer("203.0.113.9")
    assert get(kept).startswith(b"HTTP/1.1 200") and get(other).startswith(b"HTTP/1.1 200")
    assert security(d, "block-ip", "203.0.113.8").returncode == 0
    kept.settimeout(10)  # closed within a second; the margin is for a loaded machine
    try:
        assert kept.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        pass
    assert get(other).startswith(b"HTTP/1.1 200")  # the balancer's other clients are served on
    again = raw("203.0.113.8")
    again.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello: refused before any TLS reply
    assert refused(again, wait=10.0)
