"""`ccproxy check-config`: every fault in one run with the right key named, the effective config in the
file's own schema (fed back, it parses to the same config), and nothing unescaped printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ccproxy.cli import main
from ccproxy.config import ConfigError, load, parse
from tests.support.daemon import ROOT


def faults_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, environ={})
    return [str(f) for f in info.value.faults]


PLAIN = {"server": {"tls": {"enabled": False}}}
AUDIT = {"enabled": True, "outputs": [{"type": "file", "path": "/tmp/never-written/audit.log"}]}


def test_every_fault_of_a_file_in_one_run() -> None:
    data = {
        "server": {"tls": {"enabled": False}, "port": 99999, "drain_timeout": "forever"},
        "upstreams": {"anthropic": {"base_url": "ftp://x"}},
        "security": {
            "request_validation": {"enabled": True, "max_messages": 0},
            "ddos_protection": {"max_request_size": -1},
            "audit": AUDIT,
            "rate_limting": {},
        },
    }
    assert faults_of(data) == [
        "security.rate_limting: unknown key (did you mean rate_limiting?)",
        "server.port: must be at most 65535, got 99999",
        "server.drain_timeout: expected a duration such as 30s, 10m, 1h or 30d, got 'forever'",
        "upstreams.anthropic.base_url: expected an http(s) URL, got 'ftp://x'",
        "security.ddos_protection.max_request_size: a size cannot be negative",
        "security.request_validation.max_messages: must be at least 1, got 0",
    ]


@pytest.mark.parametrize("section, key, value, message", [
    ("request_validation", "max_messages", 0, "must be at least 1, got 0"),
    ("ddos_protection", "max_request_size", -1, "a size cannot be negative"),
])
def test_a_fault_beside_an_audit_section_names_its_own_key(section: str, key: str, value: int, message: str) -> None:
    data = {**PLAIN, "security": {section: {"enabled": True, key: value}, "audit": AUDIT}}
    assert faults_of(data) == [f"security.{section}.{key}: {message}"]


def test_a_typo_is_still_named_before_the_fault_it_causes() -> None:
    assert faults_of({"server": {"tls": {"enabld": False}}}) == [
        "server.tls.enabld: unknown key (did you mean enabled?)",
        "server.tls: cert_file and key_file are required when TLS is enabled",
    ]


def _effective_yaml(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["check-config", str(path)]) == 0
    return capsys.readouterr().out


def test_the_printed_config_is_a_config_file_with_the_same_meaning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-" + "q" * 40 + "f3a9")
    monkeypatch.setenv("CCPROXY_APIKEY", "ccp-" + "k" * 40)
    source = tmp_path / "config.yaml"
    source.write_text((ROOT / "etc/ccproxy/config.yaml").read_text()
                      .replace("self_signed: true", "self_signed: false")
                      .replace("tls/cert.pem", str(tmp_path / "cert.pem"))
                      .replace("tls/key.pem", str(tmp_path / "key.pem")))
    from ccproxy.tls import write_self_signed

    write_self_signed(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    printed = _effective_yaml(source, capsys)
    assert "q" * 40 not in printed and "k" * 40 not in printed
    assert "# upstreams.anthropic.api_key: sk-ant-…f3a9" in printed
    document = yaml.safe_load(printed)
    # The file's own names and units, not the parsed values' internals.
    assert set(document) == {"server", "upstreams", "security", "state", "privacy", "admin"}
    assert document["security"]["ddos_protection"]["idle_timeout"] == "75s"
    assert document["server"]["drain_timeout"] == "30s"
    assert document["upstreams"]["anthropic"]["api_key"] == "${ANTHROPIC_API_KEY:-}"
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert load(str(again)) == load(str(source))
    assert _effective_yaml(again, capsys).split("\n", 1)[1] == printed.split("\n", 1)[1]


def test_what_the_file_holds_is_printed_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('server:\n  tls: {enabled: false}\n  "bogus\\x85\\x9b\\e[2K": 1\n', encoding="utf-8")
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "bogus\\x85\\x9b\\x1b[2K: unknown key" in err
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", err)
