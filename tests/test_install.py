"""A fresh install with packaging/install.sh, and the installed daemon started as its unprivileged user
under what can be reproduced of the unit's confinement without systemd as PID 1: another user, no new
privileges, no capabilities, a read-only config directory, and MemoryDenyWriteExecute (to show why the
unit leaves it out).

Needs root (CI runs as root): it creates a system user and bind-mounts in a private mount namespace.
The install is real: a venv made from the system's python3, the package and its dependencies from
the package index pip is configured with.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.support.daemon import ROOT, free_port

USER = "ccproxy-test"
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
# Sets MemoryDenyWriteExecute's kernel twin on this process, then execs the command: it holds there.
MDWE_EXEC = (
    "import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
    f"assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0, ctypes.get_errno(); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)

pytestmark = pytest.mark.timeout(600)


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the install tests need root, and CI runs them as root")
        pytest.skip("needs root: creates a system user and mounts")


class Host:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.prefix = base / "opt" / "ccproxy"
        self.confdir = base / "etc" / "ccproxy"
        self.unitdir = base / "systemd"
        self.statedir = base / "var" / "lib" / "ccproxy"
        self.logdir = base / "var" / "log" / "ccproxy"
        self.env = {**os.environ, "CCPROXY_PREFIX": str(self.prefix), "CCPROXY_CONFDIR": str(self.confdir),
                    "CCPROXY_UNITDIR": str(self.unitdir), "CCPROXY_STATEDIR": str(self.statedir),
                    "CCPROXY_LOGDIR": str(self.logdir), "CCPROXY_USER": USER,
                    "PYTHON": shutil.which("python3", path="/usr/bin:/bin") or "python3"}
        self.env.pop("PYTHONPATH", None)

    def install(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(ROOT / "packaging" / "install.sh"), str(ROOT)], env=self.env,
                              capture_output=True, text=True, timeout=500)

    def as_user(self, *cmd: str, mdwe: bool = False, readonly: bool = True) -> list[str]:
        """`cmd` as the service user without privileges, the config directory read-only."""
        drop = ["setpriv", "--reuid", USER, "--regid", USER, "--clear-groups", "--no-new-privs",
                "--inh-caps=-all", "--bounding-set=-all", "--", *cmd]
        if readonly:
            conf = str(self.confdir)
            script = f'mount --bind "{conf}" "{conf}" && mount -o remount,bind,ro "{conf}" && exec "$@"'
            drop = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *drop]
        return [sys.executable, "-c", MDWE_EXEC, *drop] if mdwe else drop

    def set_port(self, port: int) -> None:
        config = self.confdir / "config.yaml"
        config.write_text(config.read_text().replace("port: 8443", f"port: {port}", 1))


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    _need_root()
    existed = subprocess.run(["getent", "passwd", USER], capture_output=True).returncode == 0
    base = Path(tempfile.mkdtemp(prefix="ccproxy-host-"))
    base.chmod(0o755)  # the service user must reach the venv and /etc-like tree inside
    h = Host(base)
    result = h.install()
    assert result.returncode == 0, result.stdout + result.stderr
    h.install_output = result.stdout + result.stderr  # type: ignore[attr-defined]
    yield h
    shutil.rmtree(base, ignore_errors=True)
    if not existed:
        subprocess.run(["userdel", USER], capture_output=True)


def _mode(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    import grp
    import pwd

    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o777


def test_install_lays_out_a_fresh_host(host: Host) -> None:
    assert (host.prefix / "bin" / "twistd").exists() and (host.prefix / "bin" / "ccproxy").exists()
    caches = list(host.prefix.glob("lib/python3*/site-packages/twisted/plugins/dropin.cache"))
    assert caches, "the plugin cache was not built at install"
    assert _mode(host.confdir) == ("root", USER, 0o750)
    assert _mode(host.confdir / "config.yaml") == ("root", USER, 0o640)
    assert _mode(host.confdir / "ccproxy.env") == ("root", USER, 0o640)
    assert _mode(host.confdir / "tls" / "key.pem") == ("root", USER, 0o640)
    assert _mode(host.statedir) == (USER, USER, 0o750) and _mode(host.logdir) == (USER, USER, 0o750)
    assert (host.confdir / "config.yaml").read_bytes() == (ROOT / "etc/ccproxy/config.yaml").read_bytes()
    # What the package ships, written out by the installed command.
    shipped = subprocess.run([str(host.prefix / "bin" / "ccproxy"), "example", "unit"], capture_output=True)
    assert shipped.stdout == (ROOT / "systemd/ccproxy.service").read_bytes()
    assert (host.prefix / "share" / "doc" / "ccproxy" / "operations.md").exists()


def test_installed_unit_verifies_and_is_hardened(host: Host) -> None:
    unit = host.unitdir / "ccproxy.service"
    text = unit.read_text()
    assert f"ExecStart={host.prefix}/bin/twistd -n --pidfile= ccproxy --config {host.confdir}/config.yaml" in text
    assert f"User={USER}" in text
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True)
    exposure = re.search(r"Overall exposure level for ccproxy.service: (\d+\.\d+)", security.stdout)
    assert exposure is not None, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 2.5
    drain = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    assert drain is not None and int(drain.group(1)) > 30  # longer than the default drain_timeout


def _wait_ready(port: int, cafile: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    ctx = ssl.create_default_context(cafile=str(cafile))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the daemon exited"
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/ready", context=ctx, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("not ready in time")


def _start(host: Host, mdwe: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    host.set_port(port)
    cmd = host.as_user(str(host.prefix / "bin" / "twistd"), "-n", "--pidfile=", "ccproxy",
                       "--config", str(host.confdir / "config.yaml"), mdwe=mdwe)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    return proc, port


def test_installed_daemon_runs_as_its_user_with_a_read_only_config_dir(host: Host) -> None:
    proc, port = _start(host)
    try:
        _wait_ready(port, host.confdir / "tls" / "cert.pem", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == -signal.SIGTERM, out
    assert "listening on https://127.0.0.1" in out
    assert "plugin cache" not in out and "Traceback" not in out, out


def test_memory_deny_write_execute_stops_tls_so_the_unit_leaves_it_out(host: Host) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
        pytest.fail(f"this kernel ({os.uname().release}) lacks PR_SET_MDWE (Linux 6.3+): "
                    "MemoryDenyWriteExecute cannot be reproduced here")
    proc, _port = _start(host, mdwe=True)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode != 0
    assert "Cannot allocate write+execute memory for ffi.callback()" in out
    unit = (ROOT / "systemd" / "ccproxy.service").read_text()
    assert not re.search(r"^MemoryDenyWriteExecute=", unit, re.M)


def _config_with(host: Host, name: str, tls: str) -> Path:
    path = host.base / f"{name}.yaml"
    path.write_text(f"server:\n  port: {free_port()}\n  tls:\n{tls}")
    path.chmod(0o644)
    return path


def test_a_config_the_user_cannot_act_on_is_refused_in_one_line_each(host: Host) -> None:
    secret = host.base / "root-only"
    secret.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(host.confdir / "tls" / "key.pem", secret / "key.pem")
    cases = {
        # A self-signed certificate to be written where the user cannot write.
        "selfsigned": (f"    cert_file: {host.confdir}/new/cert.pem\n    key_file: {host.confdir}/new/key.pem\n"
                       "    self_signed: true\n", ["server.tls.cert_file", "server.tls.key_file"]),
        # A key only root may read.
        "unreadable": (f"    cert_file: {host.confdir}/tls/cert.pem\n    key_file: {secret}/key.pem\n",
                       ["server.tls.key_file"]),
    }
    for name, (tls, paths) in cases.items():
        config = _config_with(host, name, tls)
        check = subprocess.run(host.as_user(str(host.prefix / "bin" / "ccproxy"), "check-config", str(config)),
                               capture_output=True, text=True, cwd="/")
        assert check.returncode == 1, check
        lines = check.stderr.splitlines()
        assert [line.split(": unusable: ")[1].split(":")[0] for line in lines] == paths, check.stderr
        assert all(f"user {USER}" in line for line in lines) and "Traceback" not in check.stderr
        start = subprocess.run(host.as_user(str(host.prefix / "bin" / "twistd"), "-n", "--pidfile=", "ccproxy",
                                            "--config", str(config)),
                               capture_output=True, text=True, cwd="/", timeout=60)
        assert start.returncode != 0
        out = start.stdout + start.stderr
        assert "Traceback" not in out
        assert re.findall(r"unusable config \S+: (\S+):", out) == paths, out


# -- the container image's entrypoint, without a container runtime


def _dockerfile() -> dict[str, Any]:
    """ENTRYPOINT, CMD, VOLUME and USER of the runtime stage, as the image would carry them."""
    text = (ROOT / "Dockerfile").read_text()
    runtime = text[text.rindex("\nFROM "):]
    out: dict[str, Any] = {}
    for name in ("ENTRYPOINT", "CMD", "VOLUME"):
        match = re.search(rf"^{name} (\[.*\])$", runtime, re.M)
        assert match is not None, name
        out[name] = json.loads(match.group(1))
    user = re.search(r"^USER (\d+):(\d+)$", runtime, re.M)
    assert user is not None
    out["USER"] = (user.group(1), user.group(2))
    return out


def _manifest() -> dict[str, Any]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text())}


def test_the_manifest_runs_the_image_as_the_seed_asks() -> None:
    manifest = _manifest()
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= set(manifest)
    pod = manifest["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    container = pod["containers"][0]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["limits"] == {"memory": "1Gi", "cpu": "1000m"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/ccproxy"]["readOnly"] is True
    assert set(_dockerfile()["VOLUME"]) <= set(mounts)
    drain = yaml.safe_load(manifest["ConfigMap"]["data"]["config.yaml"])["server"]["drain_timeout"]
    assert pod["terminationGracePeriodSeconds"] > int(drain.rstrip("s"))


def test_the_image_entrypoint_runs_on_a_read_only_root_with_only_its_volumes_writable(host: Host) -> None:
    """The image's exact command, as its user, in a root filesystem made read-only (an overlay of this
    host's, so nothing here is changed), the venv at /opt/ccproxy, the manifest's config mounted
    read-only at /etc/ccproxy, and tmpfs only at the image's volumes and /tmp."""
    image = _dockerfile()
    uid, gid = image["USER"]
    work = Path(tempfile.mkdtemp(prefix="ccproxy-image-"))
    work.chmod(0o755)
    try:
        conf = work / "etc-ccproxy"
        (conf / "tls").mkdir(parents=True)
        port = free_port("0.0.0.0")
        config = yaml.safe_load(_manifest()["ConfigMap"]["data"]["config.yaml"])
        config["server"]["port"] = port  # the only change: this host's network is shared
        (conf / "config.yaml").write_text(yaml.safe_dump(config))
        ca = trustme.CA(key_type=trustme.KeyType.RSA)
        cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
        cert.cert_chain_pems[0].write_to_path(str(conf / "tls" / "tls.crt"))
        cert.private_key_pem.write_to_path(str(conf / "tls" / "tls.key"))
        ca.cert_pem.write_to_path(str(work / "ca.pem"))
        for path in (conf, conf / "tls", conf / "config.yaml", conf / "tls" / "tls.crt", conf / "tls" / "tls.key"):
            os.chown(path, 0, int(gid))
            path.chmod(0o750 if path.is_dir() else 0o440)  # as the projected volume: group-readable only
        # The venv as the image holds it: at /opt/ccproxy, its scripts' interpreter line saying so.
        venv = work / "venv"
        shutil.copytree(host.prefix, venv, symlinks=True)
        for script_path in (venv / "bin").iterdir():
            if script_path.is_file() and not script_path.is_symlink():
                data = script_path.read_bytes()
                if data.startswith(b"#!" + str(host.prefix).encode()):
                    script_path.write_bytes(b"#!/opt/ccproxy" + data[2 + len(str(host.prefix)):])
        root = work / "root"
        writable = [*image["VOLUME"], "/tmp"]
        script = "\n".join([
            "set -e",
            f'mkdir -p "{work}/ov" "{root}"',
            f'mount -t tmpfs tmpfs "{work}/ov"',
            f'mkdir -p "{work}/ov/upper" "{work}/ov/work"',
            f'mount -t overlay overlay -o "lowerdir=/,upperdir={work}/ov/upper,workdir={work}/ov/work" "{root}"',
            f'mkdir -p "{root}/opt/ccproxy" "{root}/etc/ccproxy"',
            f'mount --bind "{venv}" "{root}/opt/ccproxy"',
            f'mount --bind "{conf}" "{root}/etc/ccproxy"',
            f'mount -o remount,bind,ro "{root}/etc/ccproxy"',
            *[f'mkdir -p "{root}{path}" && mount -t tmpfs -o mode=0750,uid={uid},gid={gid} tmpfs "{root}{path}"'
              for path in writable],
            f'mount -t proc proc "{root}/proc"',
            f'mount --rbind /dev "{root}/dev"',
            f'mount -o remount,ro "{root}"',
            f'cd "{root}"',
            'exec chroot . "$@"',
        ])
        drop = ["setpriv", "--reuid", uid, "--regid", gid, "--clear-groups", "--no-new-privs",
                "--inh-caps=-all", "--bounding-set=-all", "--"]
        command = [*image["ENTRYPOINT"], *image["CMD"]]
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                                 "sh", "-c", 'cd /var/lib/ccproxy && exec "$@"', "sh", *drop, *command],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
                                     "CCPROXY_AUDIT_HMAC_KEY": "k" * 32})
        try:
            try:
                _wait_ready(port, work / "ca.pem", proc)
            except AssertionError:
                proc.kill()
                raise AssertionError(proc.communicate(timeout=30)[0].decode()) from None
            ctx = ssl.create_default_context(cafile=str(work / "ca.pem"))
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=5) as r:
                assert r.status == 200
            # What the image may not write, it did not: the overlay's upper layer holds only the
            # mount points made before the root went read-only.
            upper = {str(p.relative_to(work / "ov" / "upper")) for p in (work / "ov" / "upper").rglob("*")}
            assert upper <= {"opt", "opt/ccproxy", "etc", "etc/ccproxy", "var", "var/lib", "var/lib/ccproxy",
                             "var/log", "var/log/ccproxy", "tmp"}, upper
        finally:
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=60)[0].decode()
        assert "Traceback" not in out and "Read-only file system" not in out, out
        assert f"listening on https://0.0.0.0:{port}" in out, out
    finally:
        shutil.rmtree(work, ignore_errors=True)
