"""Preflight: the files a valid config names that this process could not read or write, each fault named by
its YAML path and the user it was checked as; `twistd ccproxy` refuses such a config before it starts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage

from ccproxy import preflight
from ccproxy.config import parse
from ccproxy.tap import Options

NOBODY = 65534
NO_NAME = 54321  # a uid without a passwd entry


def faults(data: dict[str, Any], base: Path) -> list[str]:
    return [str(f) for f in preflight.check(parse(data, str(base), environ={}))]


def tls(base: Path, **keys: Any) -> dict[str, Any]:
    return {"server": {"host": "127.0.0.1", "tls": {"enabled": True, "cert_file": str(base / "c.pem"),
                                                     "key_file": str(base / "k.pem"), **keys}}}


def audit(*outputs: dict[str, Any]) -> dict[str, Any]:
    return {"server": {"tls": {"enabled": False}}, "security": {"audit": {"outputs": list(outputs)}}}


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user can reach (pytest's own tmp folder is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ccproxy-preflight-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@contextmanager
def as_user(uid: int) -> Iterator[None]:
    """Run the block as `uid` (real and effective, as a service user is); root comes back after.

    Without root the process is unprivileged already: the block runs as it is.
    """
    if os.geteuid() != 0:
        yield
        return
    os.setresgid(NOBODY, NOBODY, 0)
    os.setresuid(uid, uid, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


def test_a_config_whose_files_exist_and_can_be_used_has_no_fault(tmp_path: Path) -> None:
    from ccproxy.tls import write_self_signed

    write_self_signed(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), ("localhost",))
    assert faults(tls(tmp_path), tmp_path) == []
    assert faults(audit({"type": "file", "path": str(tmp_path / "new" / "deeper" / "audit.log")}), tmp_path) == []


def test_missing_certificate_files_are_named_with_what_is_missing(tmp_path: Path) -> None:
    data = tls(tmp_path, key_file=str(tmp_path / "no-such-dir" / "k.pem"))
    assert faults(data, tmp_path) == [
        f"server.tls.cert_file: cannot read {tmp_path}/c.pem: no such file for {preflight.whoami()}",
        f"server.tls.key_file: cannot read {tmp_path}/no-such-dir/k.pem: no such file or directory "
        f"for {preflight.whoami()}",
    ]


def test_a_directory_given_as_a_certificate_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.pem").mkdir()
    (tmp_path / "k.pem").write_text("")
    assert faults(tls(tmp_path), tmp_path) == [
        f"server.tls.cert_file: cannot read {tmp_path}/c.pem: is a directory for {preflight.whoami()}"]


def test_readable_files_that_are_not_a_certificate_and_key_are_refused_by_the_tls_check(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate\n")
    (tmp_path / "k.pem").write_text("not a key\n")
    found = faults(tls(tmp_path), tmp_path)
    assert len(found) == 1 and found[0].startswith("server.tls."), found


def test_files_the_service_user_cannot_read_are_refused_as_that_user(shared: Path) -> None:
    from ccproxy.tls import write_self_signed

    write_self_signed(str(shared / "c.pem"), str(shared / "k.pem"), ("localhost",))
    (shared / "k.pem").chmod(0o600)  # as an operator's key readable by root alone
    private = shared / "private"
    private.mkdir(mode=0o700)  # a folder the user cannot search: the file in it is not "missing"
    (private / "c.pem").write_bytes((shared / "c.pem").read_bytes())
    if os.geteuid() != 0:
        (shared / "k.pem").chmod(0o000)
        private.chmod(0o000)
    try:
        with as_user(NOBODY):
            me = preflight.whoami()
            found = faults(tls(shared, cert_file=str(private / "c.pem")), shared)
    finally:
        private.chmod(0o700)
    if os.geteuid() == 0:
        assert me == f"user nobody (uid {NOBODY})"
    assert found == [
        f"server.tls.cert_file: cannot read {private}/c.pem: permission denied for {me}",
        f"server.tls.key_file: cannot read {shared}/k.pem: permission denied for {me}",
    ]


def test_self_signed_files_to_be_created_where_they_cannot_be(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "c.pem").mkdir()
    data = tls(tmp_path, self_signed=True, key_file=str(tmp_path / "file" / "sub" / "k.pem"))
    assert faults(data, tmp_path) == [
        f"server.tls.cert_file: self_signed cannot create {tmp_path}/c.pem: is a directory for {preflight.whoami()}",
        f"server.tls.key_file: self_signed cannot create {tmp_path}/file/sub/k.pem: {tmp_path}/file is not a "
        f"directory for {preflight.whoami()}",
    ]
    # Missing folders are made: a path below ones that do not exist yet is fine.
    assert faults(tls(tmp_path / "a", self_signed=True), tmp_path) == []


def test_audit_files_and_spools_the_service_user_cannot_write(shared: Path) -> None:
    locked = shared / "locked"
    locked.mkdir(mode=0o755)  # searchable, not writable by the user
    (shared / "audit.log").write_text("")
    (shared / "audit.log").chmod(0o644)
    if os.geteuid() != 0:
        locked.chmod(0o555)
        (shared / "audit.log").chmod(0o444)
    data = audit({"type": "file", "path": str(shared / "audit.log")},
                 {"type": "file", "path": str(locked / "new" / "access.log"), "records": "access"},
                 {"type": "syslog", "protocol": "udp", "host": "127.0.0.1", "spool_path": str(locked / "s.spool")})
    try:
        with as_user(NOBODY):
            me = preflight.whoami()
            found = faults(data, shared)
    finally:
        locked.chmod(0o755)
    assert found == [
        f"security.audit.outputs[0].path: cannot write {shared}/audit.log: permission denied for {me}",
        f"security.audit.outputs[1].path: cannot write {locked}/new/access.log: directory {locked} is not "
        f"writable for {me}",
        f"security.audit.outputs[2].spool_path: cannot write {locked}/s.spool: directory {locked} is not "
        f"writable for {me}",
    ]
    assert faults(audit({"type": "file", "path": str(shared)}), shared) == [
        f"security.audit.outputs[0].path: cannot write {shared}: is a directory for {preflight.whoami()}"]


def test_a_user_without_a_name_is_named_by_its_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        with as_user(NO_NAME):
            assert preflight.whoami() == f"uid {NO_NAME}"
    else:  # the passwd database knows no name for this user
        def unknown(uid: int) -> Any:
            raise KeyError(uid)

        monkeypatch.setattr(preflight.pwd, "getpwuid", unknown)
        assert preflight.whoami() == f"uid {os.geteuid()}"


def test_twistd_refuses_an_unusable_config_with_one_line_per_fault(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"server:\n  tls:\n    enabled: true\n    cert_file: {tmp_path}/c.pem\n"
                    f"    key_file: {tmp_path}/k.pem\n")
    options = Options()
    with pytest.raises(usage.UsageError) as info:
        options.parseOptions(["--config", str(path)])
    lines = str(info.value).splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"unusable config {path}", "server.tls.cert_file"], [f"unusable config {path}", "server.tls.key_file"]]


def test_twistd_refuses_an_unknown_log_format_and_an_invalid_config(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--log-format must be one of"):
        Options().parseOptions(["--config", str(tmp_path / "none.yaml"), "--log-format", "xml"])
    path = tmp_path / "c.yaml"
    path.write_text('server:\n  tls: {enabled: false}\n  "p\\x1bort": 1\n')
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["--config", str(path)])
    # What the file holds is escaped: a control character never reaches the terminal or the log.
    assert str(info.value) == f"invalid config {path}: server.p\\x1bort: unknown key (did you mean port?)"


# -- what twistd's own options choose


def _valid(tmp_path: Path, **server: Any) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"server": {"tls": {"enabled": False}, **server}, "admin": {"enabled": False}}))
    return path


@pytest.mark.parametrize(("parent", "chosen"), [
    ({"nodaemon": True}, ("text", "")),  # twistd -n: standard output
    ({"nodaemon": False}, ("file", "twistd.log")),  # daemonised: where twistd itself would write
    ({"nodaemon": False, "logfile": "-"}, ("text", "")),
    ({"nodaemon": True, "logfile": "/var/log/ccproxy.log"}, ("file", "/var/log/ccproxy.log")),
    ({"syslog": True, "prefix": "twisted"}, ("syslog", "ccproxy")),  # twistd's default prefix is not ours
    ({"syslog": True, "prefix": "edge-proxy"}, ("syslog", "edge-proxy")),
])
def test_twistd_logs_through_our_observer_where_its_options_say(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parent: dict[str, Any], chosen: tuple[str, str]) -> None:
    from ccproxy import logs

    monkeypatch.setattr(logs, "_chosen", logs._chosen)  # restored after the test
    options = Options()
    options.parent = dict(parent)  # type: ignore[attr-defined]
    options.parseOptions(["--config", str(_valid(tmp_path)), "--log-format", "text"])
    assert options.parent["logger"] == "ccproxy.logs.observer"  # type: ignore[attr-defined]
    assert logs._chosen == chosen


def test_a_logger_given_to_twistd_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ccproxy import logs

    monkeypatch.setattr(logs, "_chosen", ("sentinel", ""))
    options = Options()
    options.parent = {"logger": "my.observer"}  # type: ignore[attr-defined]
    options.parseOptions(["--config", str(_valid(tmp_path))])
    assert options.parent["logger"] == "my.observer" and logs._chosen == ("sentinel", "")  # type: ignore[attr-defined]


def test_the_service_is_one_proxy_or_a_supervisor_of_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ccproxy.service import ProxyService
    from ccproxy.tap import makeService
    from ccproxy.workers.supervisor import Supervisor
    from ccproxy.workers.worker import INDEX

    monkeypatch.delenv(INDEX, raising=False)
    one = Options()
    one.parseOptions(["--config", str(_valid(tmp_path))])
    assert isinstance(makeService(one), ProxyService)
    many = Options()
    many.parseOptions(["--config", str(_valid(tmp_path, workers=2))])
    supervisor = makeService(many)
    assert isinstance(supervisor, Supervisor) and supervisor.count == 2
    monkeypatch.setenv(INDEX, "1")  # a worker the supervisor started serves itself
    assert isinstance(makeService(many), ProxyService)
