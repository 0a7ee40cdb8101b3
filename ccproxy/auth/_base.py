"""What every way of authenticating shares: reading the credential, and the refusal it raises."""

from __future__ import annotations

from typing import Protocol

import attrs
from twisted.web.http_headers import Headers

from ccproxy.context import Identity, RequestContext

CREDENTIAL_HEADERS = (b"x-api-key", b"authorization")


@attrs.define
class AuthFailure(Exception):
    """A refused credential. `message` goes to the client; `reason` and the rest to the event only."""

    status: int
    message: str
    reason: str
    key_id: str | None = None
    user_id: str | None = None
    # For a key nobody knows: its mask (`sk-ant-…f3a9`), so an operator can tell which old key a
    # client still sends.
    mask: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)


class Authenticator(Protocol):
    async def authenticate(self, credential: str, ctx: RequestContext) -> Identity: ...

    def stop(self) -> None: ...


def credential(headers: Headers) -> str | None:
    """The client's credential: `x-api-key`, else `Authorization: Bearer`; None when neither."""
    for value in headers.getRawHeaders(b"x-api-key", []):
        token = value.strip()
        if token:
            return token.decode("latin-1")
    for value in headers.getRawHeaders(b"authorization", []):
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip().decode("latin-1")
    return None


def strip_credentials(headers: Headers) -> None:
    """Our clients' credentials are ccproxy's, never the upstream's."""
    for name in CREDENTIAL_HEADERS:
        headers.removeHeader(name)
