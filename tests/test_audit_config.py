"""The example config's commented audit block is valid, and the audit keys are checked strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ccproxy.config import ConfigError
from tests.support.audit import config

EXAMPLE = Path(__file__).resolve().parents[1] / "etc" / "ccproxy" / "config.yaml"


def _example_block() -> dict[str, object]:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("#  audit:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#  "):
            break
        block.append(line[3:])
    return yaml.safe_load("\n".join(block))["audit"]


def test_the_commented_example_parses() -> None:
    audit = config(_example_block(), privacy={"gdpr": {"data_retention": "90d"}}).audit
    assert audit.enabled and len(audit.outputs) == 3
    file, syslog, access = audit.outputs
    assert file.max_size == 100 * 1024 * 1024 and file.retention == 90 * 86400
    assert syslog.protocol == "tcp" and syslog.facility == 4 and syslog.port == 6514 and syslog.tls
    assert access.records == "access"


@pytest.mark.parametrize(("audit", "path"), [
    ({"outputs": [{"type": "kafka"}]}, "security.audit.outputs[0].type"),
    ({"outputs": [{"type": "file"}]}, "security.audit.outputs[0].path"),
    ({"outputs": [{"type": "file", "path": "/x", "rotation": "weekly"}]}, "security.audit.outputs[0].rotation"),
    ({"outputs": [{"type": "file", "path": "/x", "retension": "1d"}]}, "security.audit.outputs[0].retension"),
    ({"outputs": [{"type": "syslog", "host": "h", "protocol": "sctp"}]}, "security.audit.outputs[0].protocol"),
    ({"outputs": [{"type": "syslog", "host": "h", "facility": "local9"}]}, "security.audit.outputs[0].facility"),
    ({"outputs": [{"type": "syslog", "host": "h", "app_name": "two words"}]},
     "security.audit.outputs[0].app_name"),
    ({"outputs": [{"type": "syslog", "protocol": "unix", "host": "h"}]}, "security.audit.outputs[0].host"),
    ({"outputs": [{"type": "file", "path": "/x"}, {"type": "file", "path": "/x"}]}, "security.audit.outputs[1]"),
])
def test_bad_audit_settings_name_their_path(audit: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(audit)
    assert e.value.path == path


def test_defaults() -> None:
    audit = config({"outputs": [{"type": "syslog", "host": "127.0.0.1"}]}).audit
    [out] = audit.outputs
    assert (out.protocol, out.port, out.facility, out.app_name, out.records) == ("udp", 514, 4, "ccproxy", "audit")
    assert out.spool_path.startswith("/var/lib/ccproxy/audit-spool/")
    assert config({}).audit.enabled is False
