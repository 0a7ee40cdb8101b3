"""The audit trail: `security.audit` and `privacy.gdpr`."""

from __future__ import annotations

import difflib
import os
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ccproxy.config._reader import ConfigError, Section
from ccproxy.secrets import Secret

# Every security event the proxy emits. A name in `events` outside this list is refused: a typo
# there would otherwise silently drop a class of records.
KNOWN_EVENTS = (
    "authentication_success",
    "authentication_failure",
    "rate_limit_exceeded",
    "rate_limit_backend_unavailable",
    "rate_limit_backend_recovered",
    "invalid_request",
    "configuration_change",
    "api_key_rotation",
    "api_key_rotation_due",
    "api_key_expiring",
    "ip_auto_blocked",
    "ip_unblocked",
    "connection_refused",
    "request_too_large",
    "request_timeout",
    "response_masked",
    "upstream_error",
    "audit_records_lost",
    "audit_file_damaged",
    "audit_file_replaced",
    "audit_records_missing",
    "privacy_subject_erased",
    "ip_blocked",
    "emergency_mode",
    "admin_command",
    "security_alert",
    "suspicious_request",
)
# What the trail says about its own evidence is always written, whatever `events` filters out.
ALWAYS = ("audit_records_lost", "audit_file_damaged", "audit_file_replaced", "audit_records_missing",
          "privacy_subject_erased")

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}

DEFAULT_SPOOL_DIR = "/var/lib/ccproxy/audit-spool"


@attrs.frozen
class FileOutput:
    path: str
    records: str = "audit"  # "audit" (security events) or "access" (one line per request)
    rotation: str = "daily"
    max_size: int | None = None
    retention: float | None = None
    flush_interval: float = 0.2
    sync_interval: float = 1.0
    checkpoint_path: str = ""


@attrs.frozen
class SyslogOutput:
    host: str
    port: int
    protocol: str = "tcp"
    records: str = "audit"
    facility: int = FACILITIES["auth"]
    app_name: str = "ccproxy"
    queue_size: int = 10000
    spool_path: str = ""
    spool_max_size: int = 100 * 1024 * 1024
    # RFC 5425: syslog over TLS (tcp only), the server checked against ca_file (default: system CAs).
    tls: bool = False
    ca_file: str | None = None
    server_name: str | None = None


Output = FileOutput | SyslogOutput


@attrs.frozen
class AuditConfig:
    enabled: bool = False
    events: tuple[str, ...] = KNOWN_EVENTS
    outputs: tuple[Output, ...] = ()
    hmac_key: Secret | None = None
    anonymize_logs: bool = False
    anonymize_method: str = "truncate"
    anonymize_key: Secret | None = None
    data_retention: float | None = None
    checkpoint_interval: float = 300.0
    signing_key: str | None = None  # an Ed25519 private key (PEM) that signs checkpoints

    @classmethod
    def parse(cls, root: Section) -> AuditConfig:
        audit = root.section("security").section("audit")
        gdpr = root.section("privacy").section("gdpr")
        anonymize, method, anon_key, data_retention = _parse_gdpr(gdpr)
        # A section with settings but no `enabled` is meant to run; only an explicit false turns it off.
        if not audit.enabled(bool(audit.data)):
            for key in list(audit.keys()):
                audit.raw(key, None)  # a switched-off section is accepted whole: nothing in it runs
            return cls(anonymize_logs=anonymize, anonymize_method=method, anonymize_key=anon_key,
                       data_retention=data_retention)
        events = _parse_events(audit)
        outputs = audit.items("outputs", lambda item, path: _parse_output(item, path, audit.base_dir))
        if not outputs:
            raise ConfigError(audit.at("outputs"), "an enabled audit trail needs at least one output")
        _check_distinct(outputs, audit.at("outputs"))
        checkpoints = audit.section("checkpoints")
        interval = checkpoints.duration("interval", 300.0, min=1.0, max=86400.0)
        signing_key = checkpoints.file("signing_key", None)
        if signing_key is not None:
            _check_signing_key(signing_key, checkpoints.at("signing_key"))
        checkpoints.done()
        return cls(
            enabled=True, events=events, outputs=outputs, hmac_key=audit.secret("hmac_key", None),
            anonymize_logs=anonymize, anonymize_method=method, anonymize_key=anon_key,
            data_retention=data_retention, checkpoint_interval=interval, signing_key=signing_key,
        )


def _parse_gdpr(gdpr: Section) -> tuple[bool, str, Secret | None, float | None]:
    if not gdpr.enabled(True):
        for key in list(gdpr.keys()):
            gdpr.raw(key, None)
        return False, "truncate", None, None
    anonymize = bool(gdpr.boolean("anonymize_logs", False))
    method = gdpr.string("anonymize_method", "truncate", choices=("truncate", "hash"))
    secret = gdpr.secret("anonymize_key", None)
    if anonymize and method == "hash" and secret is None:
        raise ConfigError(gdpr.at("anonymize_key"), "is required when anonymize_method is hash")
    retention = gdpr.duration("data_retention", None, min=3600.0)
    return anonymize, method, secret, retention


def _parse_events(audit: Section) -> tuple[str, ...]:
    if "events" not in audit:
        return KNOWN_EVENTS
    names = audit.str_list("events")
    for i, name in enumerate(names):
        if name not in KNOWN_EVENTS:
            hint = difflib.get_close_matches(name, KNOWN_EVENTS, n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"{audit.at('events')}[{i}]", f"unknown event {name!r}{suffix}")
    # Losing records, and what the trail finds wrong with its own files, is always reported.
    return tuple(dict.fromkeys((*names, *ALWAYS)))


def _parse_output(item: Any, path: str, base_dir: str) -> Output:
    section = Section(item, path, base_dir)
    kind = section.string("type", choices=("file", "syslog"))
    records = section.string("records", "audit", choices=("audit", "access"))
    out: Output
    if kind == "file":
        path = section.file("path")
        out = FileOutput(
            path=path,
            records=records,
            rotation=section.string("rotation", "daily", choices=("daily",)),
            max_size=section.size("max_size", None, min=4096),
            retention=section.duration("retention", None, min=3600.0),
            flush_interval=section.duration("flush_interval", 0.2, min=0.001, max=10.0),
            sync_interval=section.duration("sync_interval", 1.0, min=0.01, max=300.0),
            checkpoint_path=section.file("checkpoint_path", path + ".checkpoints"),
        )
    else:
        out = _parse_syslog(section, records)
    section.done()
    return out


def _parse_syslog(section: Section, records: str) -> SyslogOutput:
    protocol = section.string("protocol", "udp", choices=("tcp", "udp", "unix"))
    tls = section.section("tls")
    use_tls = bool(tls.enabled(bool(tls.data)))
    if use_tls and protocol != "tcp":
        raise ConfigError(tls.path, "syslog over TLS (RFC 5425) needs protocol tcp")
    ca_file = tls.file("ca_file", None) if use_tls else None
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        raise ConfigError(tls.at("ca_file"), f"cannot read {ca_file}")
    server_name = tls.string("server_name", None) if use_tls else None
    if not use_tls:
        for key in list(tls.keys()):
            tls.raw(key, None)
    if protocol == "unix":
        host, port = section.file("path", "/dev/log"), 0
        section.not_supported("host", "not used with protocol unix (set path)")
        section.not_supported("port", "not used with protocol unix (set path)")
    else:
        host = section.string("host")
        port = section.integer("port", 6514 if use_tls else 514, min=1, max=65535)
        section.not_supported("path", "only used with protocol unix")
    facility = section.string("facility", "auth", choices=tuple(FACILITIES))
    app_name = section.string("app_name", "ccproxy")
    if len(app_name) > 48 or not all(33 <= ord(c) <= 126 for c in app_name):
        raise ConfigError(section.at("app_name"), "must be 1 to 48 printable ASCII characters without spaces")
    default_spool = f"{DEFAULT_SPOOL_DIR}/{protocol}-{host.strip('/').replace('/', '_')}-{port}.spool"
    return SyslogOutput(
        host=host, port=port, protocol=protocol, records=records, facility=FACILITIES[facility],
        app_name=app_name, queue_size=section.integer("queue_size", 10000, min=1),
        spool_path=section.file("spool_path", default_spool),
        spool_max_size=section.size("spool_max_size", 100 * 1024 * 1024, min=0),
        tls=use_tls, ca_file=ca_file, server_name=server_name,
    )


def _check_distinct(outputs: tuple[Output, ...], path: str) -> None:
    seen: set[str] = set()
    for i, out in enumerate(outputs):
        keys = (out.path, out.checkpoint_path) if isinstance(out, FileOutput) else (out.spool_path,)
        for key in keys:
            if key in seen:
                raise ConfigError(f"{path}[{i}]", f"{key} is already used by another output")
            seen.add(key)


def _check_signing_key(path: str, where: str) -> None:
    try:
        load_private_key(path)
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(where, f"{path}: not an unencrypted Ed25519 private key in PEM ({e})") from None


def load_private_key(path: str) -> Ed25519PrivateKey:
    """The checkpoint signing key: read here so that the config can check it without the audit code."""
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key
