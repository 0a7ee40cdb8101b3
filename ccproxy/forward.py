"""Forwarding to the upstream APIs over one shared pool of persistent connections.

Not treq: it follows redirects, decompresses, buffers bodies and shares one cookie jar between
callers, and a faithful proxy wants none of that. See `ccproxy.http.client` for the client itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ccproxy.config.server import UpstreamConfig
from ccproxy.deadline import TimedOut, within
from ccproxy.errors import ANTHROPIC, ApiError
from ccproxy.http.client import Fields, PoolKey, UpstreamPool, UpstreamResponse, protocol_error
from ccproxy.routes import Route

log = Logger()

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the transport layer on the way out, never copied from the other side.
_FRAMING = frozenset({b"host", b"content-length"})
CREDENTIALS = frozenset({b"x-api-key", b"authorization"})
_SKIP = HOP_BY_HOP | _FRAMING
_SKIP_KEEPING_LENGTH = _SKIP - {b"content-length"}


# The usual Connection values name nothing beyond the hop-by-hop set: no parsing needed.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    values = headers.getRawHeaders(b"connection")
    if not values or (len(values) == 1 and values[0] in _PLAIN_CONNECTION):
        return frozenset()
    tokens: set[bytes] = set()
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _not_passed_on(headers: Headers, base: frozenset[bytes] = _SKIP, also: Iterable[bytes] = ()) -> frozenset[bytes]:
    """Lower-case names of `headers` that do not cross the proxy: `base`, those `Connection` names, `also`."""
    named = _connection_tokens(headers)
    return base | named | frozenset(also) if named or also else base


def end_to_end(headers: Headers, drop: Iterable[bytes] = ()) -> Iterable[tuple[bytes, Sequence[bytes]]]:
    """The end-to-end headers of a message: hop-by-hop ones, and those `Connection` names, removed."""
    skip = _not_passed_on(headers, also=drop)
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip:
            yield name, values


def upstream_headers(client: Headers, upstream: UpstreamConfig, api: str) -> list[tuple[bytes, Sequence[bytes]]]:
    """Client headers as the upstream should see them: our key in place of the client's."""
    key = upstream.api_key
    # The Host of the upstream, not the one the client sent to ccproxy.
    out: list[tuple[bytes, Sequence[bytes]]] = [(b"Host", [upstream_host(upstream)])]
    out.extend(end_to_end(client, CREDENTIALS if key is not None else ()))
    if key is not None:
        if api == ANTHROPIC:
            out.append((b"X-Api-Key", [key.reveal().encode()]))
        else:
            out.append((b"Authorization", [b"Bearer " + key.reveal().encode()]))
    return out


def response_headers(upstream: Headers, keep_length: bool) -> Headers:
    """The upstream's response headers, made fit for the client in place: hop-by-hop ones, and
    those `Connection` names, removed; Content-Length too unless the body goes through unchanged."""
    skip = _not_passed_on(upstream, _SKIP_KEEPING_LENGTH if keep_length else _SKIP)
    for name in [name for name, _ in upstream.getAllRawHeaders() if name.lower() in skip]:
        upstream.removeHeader(name)
    return upstream


@lru_cache(maxsize=64)
def upstream_host(upstream: UpstreamConfig) -> bytes:
    return urlsplit(upstream.base_url).netloc.encode("idna")


@implementer(IPolicyForHTTPS)
class _CAFilePolicy:
    """Verifies upstream certificates against a configured CA file instead of the system store."""

    def __init__(self, ca_file: str) -> None:
        with open(ca_file, "rb") as f:
            self._root = Certificate.loadPEM(f.read())

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return optionsForClientTLS(hostname.decode("idna"), trustRoot=self._root)


def upstream_endpoint(reactor: Any, policy: IPolicyForHTTPS, uri: URI, timeout: float) -> IStreamClientEndpoint:
    """TCP to the upstream's host and port (every address the name has, tried as happy eyeballs),
    in TLS checked by `policy` for https."""
    endpoint = HostnameEndpoint(reactor, uri.host.decode("ascii"), uri.port, timeout=timeout)
    if uri.scheme == b"https":
        return wrapClientTLS(policy.creatorForNetloc(uri.host, uri.port), endpoint)
    return endpoint


class Forwarder:
    """Sends requests upstream over one pool of persistent connections, with per-upstream timeouts."""

    def __init__(self, reactor: IReactorTime, pool: UpstreamPool | None = None) -> None:
        self.reactor = reactor
        # Idle connections close after 50 s: sooner than the upstreams' own idle timeouts, so a
        # pooled connection is rarely stale when reused.
        self.pool = pool or UpstreamPool(reactor, max_idle_per_host=256, idle_timeout=50.0)
        self._targets: dict[UpstreamConfig, tuple[PoolKey, IStreamClientEndpoint, bytes]] = {}

    def target(self, upstream: UpstreamConfig) -> tuple[PoolKey, IStreamClientEndpoint, bytes]:
        """The pool key, endpoint and path prefix of an upstream: made once, not per request."""
        found = self._targets.get(upstream)
        if found is None:
            policy = _CAFilePolicy(upstream.ca_file) if upstream.ca_file else BrowserLikePolicyForHTTPS()
            uri = URI.fromBytes(upstream.base_url.encode())
            endpoint = upstream_endpoint(self.reactor, policy, uri, upstream.connect_timeout)
            # Keyed by the upstream's settings too: a reload that changes its CA or timeout gets new connections.
            key = (uri.scheme, uri.host, uri.port, hash(upstream))
            found = (key, endpoint, urlsplit(upstream.base_url).path.encode())
            self._targets = {**self._targets, upstream: found}
        return found

    async def send(self, method: bytes, route: Route, headers: Fields, body: bytes) -> UpstreamResponse:
        """The upstream's response head; ApiError 502 or 504 when it cannot be had."""
        upstream = route.upstream
        key, endpoint, prefix = self.target(upstream)
        content = body if body or method in (b"POST", b"PUT", b"PATCH") else None
        d = self.pool.request(key, endpoint, method, prefix + route.path, headers, content)
        try:
            return await within(self.reactor, upstream.read_timeout, d)
        except TimedOut:
            message = f"{upstream.name} upstream did not answer within {upstream.read_timeout:g}s"
            raise ApiError(504, message) from None
        except defer.CancelledError:
            raise
        except Exception as e:
            raise classify(e, upstream) from None

    def close(self) -> defer.Deferred[None]:
        return self.pool.close()


def classify(failure: Exception, upstream: UpstreamConfig) -> ApiError:
    """The client-facing error for a failure to get a response head from the upstream."""
    name = upstream.name
    if isinstance(failure, error.TimeoutError | defer.TimeoutError):
        return ApiError(502, f"{name} upstream unreachable: connect timed out after {upstream.connect_timeout:g}s")
    if isinstance(failure, error.DNSLookupError):
        return ApiError(502, f"{name} upstream unreachable: host name not found")
    if isinstance(failure, error.ConnectError):
        return ApiError(502, f"{name} upstream unreachable: connection failed")
    broken = protocol_error(failure)
    if broken is not None:
        log.warn("upstream {name} sent an invalid response: {error}", name=name, error=str(broken))
        return ApiError(502, f"{name} upstream sent an invalid response: {broken}")
    log.warn("upstream {name} failed before answering: {failure!r}", name=name, failure=failure)
    return ApiError(502, f"{name} upstream closed the connection without answering")
