"""API keys: constant-time lookup by digest, expiry, per-key addresses, and expiry/rotation notices."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ccproxy import events
from ccproxy.auth._base import AuthFailure
from ccproxy.config.auth import ApiKey, AuthConfig, Network
from ccproxy.context import Identity, RequestContext
from ccproxy.secrets import mask

# The response header that tells a client its key expires soon (RFC 3339, UTC).
EXPIRES_HEADER = "x-ccproxy-api-key-expires"
DAY = 86400.0
# How often the notice schedule is looked at; each key is reported at most once a day.
CHECK_INTERVAL = 3600.0


def rfc3339(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def index_keys(keys: Iterable[ApiKey]) -> dict[bytes, ApiKey]:
    return {key.digest: key for key in keys}


def find_key(index: dict[bytes, ApiKey], presented: str) -> ApiKey | None:
    """The key whose SHA-256 digest matches the presented key's.

    The lookup is by digest, so its cost does not grow with the number of keys; what it could leak
    by timing is about digests of the attacker's own inputs, which says nothing of a stored key
    without a SHA-256 preimage. The final comparison is constant-time all the same.
    """
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    key = index.get(digest)
    if key is None or not hmac.compare_digest(key.digest, digest):
        return None
    return key


def ip_allowed(client_ip: str, networks: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class ApiKeyAuthenticator:
    def __init__(self, config: AuthConfig, clock: IReactorTime) -> None:
        self.keys = config.keys
        self._index = index_keys(config.keys)
        self.notification_before = config.notification_before
        self.clock = clock

    async def authenticate(self, credential: str, ctx: RequestContext) -> Identity:
        key = find_key(self._index, credential)
        if key is None:
            raise AuthFailure(401, "invalid API key", "invalid_api_key", mask=mask(credential))
        now = self.clock.seconds()
        if key.expires is not None and now >= key.expires:
            raise AuthFailure(401, "this API key has expired", "expired_api_key", key_id=key.id,
                              user_id=key.user_id)
        if key.allowed_ips and not ip_allowed(ctx.client_ip, key.allowed_ips):
            raise AuthFailure(403, "this API key may not be used from this address", "ip_not_allowed",
                              key_id=key.id, user_id=key.user_id)
        if key.expires is not None and key.expires - now <= self.notification_before:
            ctx.extra_headers[EXPIRES_HEADER] = rfc3339(key.expires)
        return Identity(key_id=key.id, name=key.name, tier=key.tier, user_id=key.user_id,
                        rate_limit=key.rate_limit)

    def stop(self) -> None:
        return None


class KeyNotices:
    """`api_key_expiring` and `api_key_rotation_due`, at start-up and then once a day per key.

    The record of what was reported survives a reload (hand the old instance to `carry`), so a reload
    does not repeat the day's notices; a key that newly needs one is reported at once.
    """

    def __init__(self, config: AuthConfig, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.reported: dict[tuple[str, str], float] = {}
        self._call: IDelayedCall | None = None

    def start(self, previous: KeyNotices | None = None) -> None:
        if previous is not None:
            self.reported = dict(previous.reported)
            _report_rotation(previous.config.keys, self.config.keys)
        # Not at once: at start-up the audit trail starts listening only when the reactor runs.
        self._call = self.clock.callLater(0, self.tick)

    def tick(self) -> None:
        now = self.clock.seconds()
        for key in self.config.keys:
            self._expiring(key, now)
            self._rotation_due(key, now)
        self._call = self.clock.callLater(CHECK_INTERVAL, self.tick)

    def _due(self, what: str, key: ApiKey, now: float) -> bool:
        last = self.reported.get((what, key.id))
        if last is not None and now - last < DAY:
            return False
        self.reported[(what, key.id)] = now
        return True

    def _expiring(self, key: ApiKey, now: float) -> None:
        if key.expires is None or not now < key.expires <= now + self.config.notification_before:
            return
        if self._due("expiring", key, now):
            events.emit("api_key_expiring", "warning", api_key_id=key.id, user_id=key.user_id,
                        expires=rfc3339(key.expires), days_left=round((key.expires - now) / DAY, 1))

    def _rotation_due(self, key: ApiKey, now: float) -> None:
        period = self.config.rotation_period
        if period is None or key.created is None or now - key.created < period:
            return
        if self._due("rotation", key, now):
            events.emit("api_key_rotation_due", "warning", api_key_id=key.id, user_id=key.user_id,
                        created=rfc3339(key.created), age_days=round((now - key.created) / DAY, 1))

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _report_rotation(old: tuple[ApiKey, ...], new: tuple[ApiKey, ...]) -> None:
    """A reload that adds, retires or replaces keys is a rotation: say which ids, never values."""
    before: dict[str, Any] = {k.id: k.digest for k in old}
    after: dict[str, Any] = {k.id: k.digest for k in new}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    replaced = sorted(i for i in set(before) & set(after) if not hmac.compare_digest(before[i], after[i]))
    if added or removed or replaced:
        events.emit("api_key_rotation", "notice", added=added, removed=removed, replaced=replaced)
