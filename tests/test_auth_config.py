"""security.auth and security.api_keys: what is accepted, and every refusal names its path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ccproxy.config import ConfigError, parse
from tests.support.authkit import config

KEY = "ccp_config-test-key-0000000000000001"


def refused(auth: dict[str, Any], api_keys: dict[str, Any] | None = None, **kw: Any) -> str:
    with pytest.raises(ConfigError) as e:
        config(auth, api_keys, **kw)
    return str(e.value)


def test_both_shapes_merge_into_one_key_set() -> None:
    cfg = config({"enabled": True, "type": "api_key", "api_keys": [{"key": KEY, "name": "production"}]},
                 {"rotation_period": "30d", "notification_before": "7d",
                  "keys": [{"id": "key-1", "key": KEY + "x", "expires": "2025-12-31"}]})
    assert [k.id for k in cfg.auth.keys] == ["production", "key-1"]
    assert cfg.auth.rotation_period == 30 * 86400 and cfg.auth.notification_before == 7 * 86400
    assert cfg.auth.keys[1].expires == 1767225600.0  # the end of 2025-12-31, UTC
    shown = repr(cfg) + repr(cfg.effective())
    assert KEY not in shown and cfg.auth.keys[0].sha256.reveal() not in shown


def test_disabled_auth_accepts_unset_env_keys() -> None:
    raw = {"server": {"tls": {"enabled": False}}, "security": {
        "auth": {"enabled": False, "api_keys": [{"key": "${CCP_KEY:-}", "name": "p"}]},
        "api_keys": {"keys": [{"id": "k", "key": "${CCP_KEY2:-}"}]}}}
    assert parse(raw, environ={}).auth.enabled is False


@pytest.mark.parametrize(("auth", "api_keys", "path", "words"), [
    ({"enabled": True, "api_keys": [{"key": "short", "name": "a"}]}, None,
     "security.auth.api_keys[0].key", "at least 16"),
    ({"enabled": True, "api_keys": [{"key": "", "name": "a"}]}, None,
     "security.auth.api_keys[0].key", "environment variable"),
    ({"enabled": True, "api_keys": [{"name": "a"}]}, None, "security.auth.api_keys[0]", "key_sha256"),
    ({"enabled": True, "api_keys": [{"key_sha256": "abc", "name": "a"}]}, None,
     "security.auth.api_keys[0].key_sha256", "64 hexadecimal"),
    ({"enabled": True, "api_keys": [{"key": KEY, "name": "a", "allowed_ips": ["10.0.0.1/8"]}]}, None,
     "security.auth.api_keys[0].allowed_ips[0]", "CIDR"),
    ({"enabled": True, "api_keys": [{"key": KEY, "name": "a", "expire": "2026-01-01"}]}, None,
     "security.auth.api_keys[0].expire", "did you mean expires"),
    ({"enabled": True, "api_keys": [{"key": KEY, "name": "a", "expires": "soon"}]}, None,
     "security.auth.api_keys[0].expires", "date"),
    ({"enabled": True, "api_keys": [{"key": KEY, "name": "a"}]}, {"keys": [{"id": "a", "key": KEY + "2"}]},
     "security", "used twice"),
    ({"enabled": True, "api_keys": [{"key": KEY, "name": "a"}]}, {"keys": [{"id": "b", "key": KEY}]},
     "security", "same value"),
    ({"enabled": True}, None, "security.auth.api_keys", "at least one key"),
    ({"enabled": True, "type": "basic"}, None, "security.auth.type", "api_key, jwt, oauth2"),
    ({"enabled": True, "type": "jwt", "jwt": {"secret": "x" * 40, "algorithms": ["HS256"]},
      "api_keys": [{"key": KEY, "name": "a"}]}, None, "security.auth.api_keys", "not checked"),
    ({"enabled": True, "api_keys": [{"key": KEY, "name": "a"}], "jwt": {}}, None, "security.auth.jwt",
     "only used when type is jwt"),
])
def test_refusals_name_the_path(auth: dict[str, Any], api_keys: Any, path: str, words: str) -> None:
    message = refused(auth, api_keys)
    assert message.startswith(path + ":") and words in message
    assert KEY not in message


def test_rotation_keys_without_auth_section_are_refused() -> None:
    raw = {"server": {"tls": {"enabled": False}}, "security": {"api_keys": {"keys": [{"id": "k", "key": KEY}]}}}
    with pytest.raises(ConfigError, match=r"^security\.api_keys\.keys: .*security\.auth enabled"):
        parse(raw, environ={})


@pytest.mark.parametrize(("jwt", "path", "words"), [
    ({"secret": "x" * 40, "algorithms": ["none"]}, "security.auth.jwt.algorithms[0]", "cannot be used"),
    ({"secret": "x" * 40, "algorithms": ["RS256"]}, "security.auth.jwt.algorithms[0]", "shared secret"),
    ({"jwks_url": "https://idp.example/jwks", "algorithms": ["HS256"]}, "security.auth.jwt.algorithms[0]",
     "public key"),
    ({"jwks_url": "https://idp.example/jwks", "algorithms": []}, "security.auth.jwt.algorithms", "at least one"),
    ({"secret": "short", "algorithms": ["HS256"]}, "security.auth.jwt.secret", "32 bytes"),
    ({"algorithms": ["RS256"]}, "security.auth.jwt", "exactly one of"),
    ({"secret": "x" * 40, "jwks_url": "https://a.example/", "algorithms": ["HS256"]}, "security.auth.jwt",
     "exactly one of"),
    ({"jwks_url": "http://idp.example/jwks", "algorithms": ["RS256"]}, "security.auth.jwt.jwks_url", "https"),
    ({"public_key_file": "missing.pem", "algorithms": ["RS256"]}, "security.auth.jwt.public_key_file",
     "cannot read"),
])
def test_jwt_refusals(jwt: dict[str, Any], path: str, words: str) -> None:
    message = refused({"enabled": True, "type": "jwt", "jwt": jwt})
    assert message.startswith(path + ":") and words in message


def test_oauth2_config() -> None:
    cfg = config({"enabled": True, "type": "oauth2", "oauth2": {
        "introspection_url": "https://idp.example/introspect", "client_id": "ccproxy",
        "client_secret": "s3cret-value-000000", "timeout": "2s", "cache_ttl": "1m"}})
    assert cfg.auth.oauth2 is not None and cfg.auth.oauth2.timeout == 2.0
    assert "s3cret-value" not in repr(cfg) + repr(cfg.effective())
    message = refused({"enabled": True, "type": "oauth2", "oauth2": {
        "introspection_url": "https://idp.example/introspect", "client_id": "ccproxy", "client_secret": ""}})
    assert message.startswith("security.auth.oauth2.client_secret:")


def test_example_config_passes_check_config_without_env() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-m", "ccproxy.cli", "check-config", "etc/ccproxy/config.yaml"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_keys_generate_prints_a_key_and_its_digest() -> None:
    import hashlib

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "ccproxy.cli", "keys", "generate", "--id", "ci"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = dict(line.strip().lstrip("- ").split(": ", 1) for line in out.stdout.splitlines()
                 if ": " in line and not line.startswith("#"))
    key = lines["key"]
    assert len(key) >= 40 and lines["id"] == "ci"
    assert lines["key_sha256"] == hashlib.sha256(key.encode()).hexdigest()
    cfg = config({"enabled": True, "api_keys": [{"id": "ci", "key_sha256": lines["key_sha256"]}]})
    assert cfg.auth.keys[0].digest == hashlib.sha256(key.encode()).digest()


def test_keys_digest_reads_the_key_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib
    import io

    from ccproxy.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("ccp_an-existing-client-key-0001\n"))
    assert main(["keys", "digest"]) == 0
    out = capsys.readouterr()
    assert out.out == hashlib.sha256(b"ccp_an-existing-client-key-0001").hexdigest() + "\n"
    assert "an-existing-client-key" not in out.out + out.err  # the key itself is never echoed
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["keys", "digest"]) == 1
    assert capsys.readouterr().err == "no key on standard input\n"


def test_keys_generate_without_an_id_names_the_key_itself(capsys: pytest.CaptureFixture[str]) -> None:
    from ccproxy.cli import main

    assert main(["keys", "generate"]) == 0
    entries = [line.strip().lstrip("- ") for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    fields = dict(entry.split(": ", 1) for entry in entries)
    assert fields["key"].startswith("ccp_") and len(fields["key"]) == 4 + 43  # 256 bits, URL-safe base64
    assert fields["id"].startswith("key-") and len(fields["id"]) == 4 + 6
