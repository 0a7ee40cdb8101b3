"""Config parsing: types, ranges, env expansion, unknown keys, and unbuilt features refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ccproxy.config import ConfigError, load, parse
from ccproxy.config._reader import parse_duration, parse_size


def error_of(data: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, environ=environ or {})
    return str(info.value)


def plain(**server: Any) -> dict[str, Any]:
    return {"server": {"tls": {"enabled": False}, **server}}


def test_defaults() -> None:
    config = parse(plain(), environ={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8443)
    assert config.upstreams.anthropic.base_url == "https://api.anthropic.com"
    assert config.upstreams.openai.base_url == "https://api.openai.com"
    assert config.upstreams.anthropic.api_key is None
    assert config.upstreams.anthropic.connect_timeout == 10.0
    assert config.upstreams.anthropic.read_timeout == 600.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h", 3600), ("30d", 2592000), ("250ms", 0.25), (5, 5), ("1.5h", 5400)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("text", ["30 sec", "-1s", "soon", True, None, "1y"])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ConfigError, match="^x: "):
        parse_duration(text, "x")


@pytest.mark.parametrize(("text", "size"), [(10485760, 10485760), ("10MB", 10485760), ("8KB", 8192),
                                            ("8KiB", 8192), ("1GB", 1 << 30), ("512", 512)])
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text, "x") == size


def test_env_expansion_and_default() -> None:
    env = {"UP_KEY": "sk-ant-api03-secretsecretsecret-f3a9", "PORT": "9000"}
    config = parse(
        {
            "server": {"port": "${PORT}", "tls": {"enabled": False}},
            "upstreams": {"anthropic": {"api_key": "${UP_KEY}"},
                          "openai": {"base_url": "${OPENAI_URL:-http://127.0.0.1:1}"}},
        },
        environ=env,
    )
    assert config.server.port == 9000
    assert config.upstreams.anthropic.api_key is not None
    assert config.upstreams.anthropic.api_key.reveal() == env["UP_KEY"]
    assert config.upstreams.openai.base_url == "http://127.0.0.1:1"


def test_unset_env_names_the_path() -> None:
    message = error_of({"upstreams": {"openai": {"api_key": "${NOPE_NOT_SET}"}}})
    assert message == "upstreams.openai.api_key: environment variable NOPE_NOT_SET is not set and has no default"


def test_empty_env_default_means_no_key() -> None:
    config = parse({**plain(), "upstreams": {"openai": {"api_key": "${NOPE_NOT_SET:-}"}}}, environ={})
    assert config.upstreams.openai.api_key is None


def test_unknown_key_with_suggestion() -> None:
    assert error_of({**plain(), "security": {"rate_limting": {}}}) == (
        "security.rate_limting: unknown key (did you mean rate_limiting?)"
    )
    assert error_of(plain(prot=1)) == "server.prot: unknown key (did you mean port?)"
    assert error_of({**plain(), "bogus": 1}) == "bogus: unknown key"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (plain(port="x"), "server.port: expected an integer, got a string"),
        (plain(port=70000), "server.port: must be at most 65535, got 70000"),
        (plain(port=True), "server.port: expected an integer, got a boolean"),
        (plain(host=""), "server.host: must not be empty"),
        ({"server": {"tls": {"enabled": "yes"}}}, "server.tls.enabled: expected true or false, got a string"),
        ({"server": {"tls": {"enabled": True}}}, "server.tls: cert_file and key_file are required when TLS is enabled"),
        ({"server": {"tls": {"enabled": False, "min_version": "1.1"}}}, "server.tls.min_version: must be 1.2 or 1.3, got '1.1'"),
        ({**plain(), "upstreams": {"anthropic": {"base_url": "ftp://x"}}},
         "upstreams.anthropic.base_url: expected an http(s) URL, got 'ftp://x'"),
        ({**plain(), "upstreams": {"anthropic": {"read_timeout": "forever"}}},
         "upstreams.anthropic.read_timeout: expected a duration such as 30s, 10m, 1h or 30d, got 'forever'"),
        ({**plain(), "upstreams": []}, "upstreams: expected a mapping, got a list"),
        ([1, 2], "(top level): expected a mapping, got a list"),
    ],
)
def test_faults_name_path(data: Any, expected: str) -> None:
    assert error_of(data) == expected


def test_tls_unknown_cipher_suite_named() -> None:
    message = error_of({"server": {"tls": {"enabled": False, "cipher_suites": [
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_RSA_WITH_RC4_128_SHA"]}}})
    assert message == "server.tls.cipher_suites[1]: unknown or unsupported cipher suite 'TLS_RSA_WITH_RC4_128_SHA'"


def test_tls13_only_suites_need_min_13() -> None:
    tls = {"enabled": False, "cipher_suites": ["TLS_AES_256_GCM_SHA384"]}
    assert "lists no TLS 1.2 suite" in error_of({"server": {"tls": tls}})
    parse({"server": {"tls": {**tls, "min_version": "1.3"}}}, environ={})


def test_unquoted_min_version_number_accepted() -> None:
    assert parse({"server": {"tls": {"enabled": False, "min_version": 1.3}}}, environ={}).server.tls.min_version == "1.3"


def test_self_signed_only_on_loopback() -> None:
    tls = {"enabled": True, "cert_file": "c.pem", "key_file": "k.pem", "self_signed": True}
    assert error_of({"server": {"host": "0.0.0.0", "tls": tls}}) == (
        "server.tls.self_signed: only allowed when server.host is a loopback address"
    )


def test_an_unknown_alert_condition_refused_loudly() -> None:
    assert error_of({**plain(), "monitoring": {"security_alerts": [{"name": "x", "condition": "x > 1 in 1m"}]}}) == (
        "monitoring.security_alerts[0].condition: unknown event or detector 'x' (short names and detectors: "
        "auth_failures, auto_blocks, command_injection_attempt, connections_refused, invalid_requests, "
        "path_traversal_attempt, prompt_injection_attempt, rate_limit_exceeded, rate_limited, request_timeouts, "
        "requests_too_large, sql_injection_attempt, upstream_errors; or an audit event name)"
    )


def test_relative_files_from_config_dir(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  tls:\n    enabled: false\n    cert_file: tls/c.pem\n    key_file: /abs/k.pem\n")
    config = load(str(path), environ={})
    assert config.server.tls.cert_file == str(tmp_path / "tls" / "c.pem")
    assert config.server.tls.key_file == "/abs/k.pem"


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: [1,\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load(str(path), environ={})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read /nonexistent/c.yaml"):
        load("/nonexistent/c.yaml", environ={})


def test_effective_config_masks_secrets() -> None:
    key = "sk-ant-api03-" + "x" * 40 + "f3a9"
    config = parse({**plain(), "upstreams": {"anthropic": {"api_key": key}}}, environ={})
    effective = config.effective()
    assert effective["upstreams"]["anthropic"]["api_key"] == "sk-ant-…f3a9"
    assert key not in repr(config)
    assert key not in str(effective)


def test_typo_reported_before_the_fault_it_causes() -> None:
    assert error_of({"server": {"tls": {"enabld": False}}}) == (
        "server.tls.enabld: unknown key (did you mean enabled?)"
    )


def test_duplicate_keys_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("security:\n  auth: {enabled: false}\nserver:\n  port: 1\nsecurity:\n  audit: {enabled: false}\n")
    with pytest.raises(ConfigError, match=r"key 'security' appears twice in one mapping \(line 5\)"):
        load(str(path), environ={})
