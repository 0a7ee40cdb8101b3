"""privacy.hipaa: each setting refuses the configs it must, accepts the ones it should, and check-config
says which hold."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ccproxy.cli import main
from ccproxy.config import ConfigError, parse

MASTER = "hipaa-test-master-key-0000000000000000000000"
TLS = {"enabled": True, "cert_file": "/etc/ccproxy/cert.pem", "key_file": "/etc/ccproxy/key.pem"}


def _good(tmp: Path | None = None) -> dict[str, Any]:
    """A config that meets every HIPAA setting."""
    where = tmp or Path("/var/log/ccproxy")
    return {
        "server": {"host": "0.0.0.0", "tls": dict(TLS)},
        "upstreams": {"anthropic": {"api_key": "sk-ant-api03-x" * 3}},
        "security": {
            "auth": {"enabled": True, "api_keys": [
                {"id": "k1", "key": "ccp-key-1-0123456789abcdef", "allowed_ips": ["10.0.0.0/8"]}]},
            "audit": {"outputs": [
                {"type": "file", "path": str(where / "audit.log")},
                {"type": "file", "path": str(where / "access.log"), "records": "access"},
                {"type": "syslog", "protocol": "tcp", "host": "logs.example", "tls": {"enabled": True}}]},
        },
        "privacy": {"hipaa": {"enabled": True, "encryption_at_rest": True, "encryption_in_transit": True,
                              "access_controls": "strict", "audit_logs": "comprehensive"},
                    "keys": {"master_key": MASTER, "store": str(where / "keys")}},
    }


def _fault(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data, environ={})
    return info.value


def _with(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(_good())
    change(data)
    return data


def test_a_config_that_meets_every_setting_is_accepted() -> None:
    config = parse(_good(), environ={})
    hipaa = config.privacy.hipaa
    assert (hipaa.encryption_at_rest, hipaa.encryption_in_transit, hipaa.access_controls, hipaa.audit_logs) == (
        True, True, "strict", "comprehensive")
    syslog = config.audit.outputs[2]
    assert syslog.tls and syslog.port == 6514  # RFC 5425's port by default


@pytest.mark.parametrize(("change", "path", "why"), [
    (lambda d: d["server"].update(tls={"enabled": False}), "server.tls.enabled", "has no TLS"),
    (lambda d: d["upstreams"]["anthropic"].update(base_url="http://api.internal"),
     "upstreams.anthropic.base_url", "http://api.internal is plain http"),
    (lambda d: d["security"]["audit"]["outputs"][2].pop("tls"), "security.audit.outputs[2]",
     "syslog over tcp to logs.example without TLS"),
    (lambda d: d["security"]["audit"]["outputs"][2].update(protocol="udp", tls={"enabled": False}),
     "security.audit.outputs[2]", "syslog over udp"),
    (lambda d: d.update(state={"backend": "redis", "redis": {"url": "redis://10.1.1.1:6379/0"}},
                        security={**d["security"], "rate_limiting": {"enabled": True, "global": {
                            "requests_per_minute": 100}}}), "state.redis.url", "reached in clear"),
])
def test_encryption_in_transit_refuses_every_plaintext_hop(change: Any, path: str, why: str) -> None:
    error = _fault(_with(change))
    assert error.path == path and why in error.message and "privacy.hipaa.encryption_in_transit" in error.message


def test_encryption_in_transit_allows_loopback_hops() -> None:
    def loopback(d: dict[str, Any]) -> None:
        d["server"] = {"host": "127.0.0.1", "tls": {"enabled": False}}
        d["upstreams"]["anthropic"]["base_url"] = "http://127.0.0.1:9000"
        d["security"]["audit"]["outputs"][2] = {"type": "syslog", "protocol": "udp", "host": "::1"}

    parse(_with(loopback), environ={})


@pytest.mark.parametrize(("change", "path", "why"), [
    (lambda d: d["security"].update(auth={"enabled": False}), "security.auth.enabled", "authentication is off"),
    (lambda d: d["security"]["auth"]["api_keys"][0].pop("allowed_ips"), "security.ip_whitelist",
     "keys without allowed_ips: k1"),
])
def test_strict_access_controls(change: Any, path: str, why: str) -> None:
    error = _fault(_with(change))
    assert error.path == path and why in error.message and "privacy.hipaa.access_controls" in error.message


def test_strict_access_controls_take_an_ip_whitelist_instead_of_allowed_ips() -> None:
    def whitelist(d: dict[str, Any]) -> None:
        d["security"]["auth"]["api_keys"][0].pop("allowed_ips")
        d["security"]["ip_whitelist"] = {"enabled": True, "ips": ["10.0.0.0/8"]}

    parse(_with(whitelist), environ={})


@pytest.mark.parametrize(("change", "path", "why"), [
    (lambda d: d["security"]["audit"].update(enabled=False), "security.audit", "the audit trail is off"),
    (lambda d: d["security"]["audit"]["outputs"].pop(1), "security.audit.outputs", "no output has records: access"),
    (lambda d: d["security"]["audit"].update(events=["authentication_failure"]), "security.audit.events",
     "leaves out authentication_success"),
])
def test_comprehensive_audit_logs(change: Any, path: str, why: str) -> None:
    error = _fault(_with(change))
    assert error.path == path and why in error.message and "privacy.hipaa.audit_logs" in error.message


def test_encryption_at_rest_needs_a_master_key() -> None:
    error = _fault(_with(lambda d: d["privacy"].pop("keys")))
    assert error.path == "privacy.keys.master_key" and "encryption_at_rest" in error.message


def test_syslog_tls_needs_tcp() -> None:
    error = _fault(_with(lambda d: d["security"]["audit"]["outputs"][2].update(protocol="udp")))
    assert error.path == "security.audit.outputs[2].tls" and "needs protocol tcp" in error.message


def test_check_config_prints_which_settings_hold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    data = _good(tmp_path)
    # check-config also checks that the daemon could read its certificate: give it a real one.
    from ccproxy.tls import write_self_signed

    write_self_signed(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    data["server"]["tls"] = {"enabled": True, "cert_file": str(tmp_path / "cert.pem"),
                             "key_file": str(tmp_path / "key.pem")}
    data["privacy"]["hipaa"].update(access_controls="standard", audit_logs="standard")
    data["security"]["audit"]["outputs"].pop(1)
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# privacy.hipaa.encryption_at_rest: holds" in out
    assert "# privacy.hipaa.encryption_in_transit: holds" in out
    assert "# privacy.hipaa.access_controls: strict: not asked for, though the config meets it" in out
    assert ("# privacy.hipaa.audit_logs: comprehensive: not asked for, and would not hold (no output has "
            "records: access") in out
    data["server"]["tls"] = {"enabled": False}
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(path)]) == 1
    assert "server.tls.enabled: the listener on 0.0.0.0 has no TLS" in capsys.readouterr().err
