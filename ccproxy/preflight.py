"""Can this process act on the config? Files it must read or write, checked as the user it runs as.

A config can be valid and still unusable by the daemon's user: a key only root may read, a
self-signed certificate to be written into a root-owned `/etc/ccproxy`, an audit file in a directory
the user cannot write. `check()` finds every such fault, each named by its YAML path, so that
`ccproxy check-config` (run as the service user, as the unit's ExecStartPre does) and the daemon's
start refuse the config with one line per fault instead of a traceback later.
"""

from __future__ import annotations

import os
import pwd

from ccproxy.config import Config, ConfigError
from ccproxy.config.audit import FileOutput, SyslogOutput


def whoami() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check(config: Config) -> list[ConfigError]:
    """Every fault that would stop this process from acting on `config`; empty when none."""
    faults: list[ConfigError] = []
    tls = config.server.tls
    if tls.enabled and tls.cert_file is not None and tls.key_file is not None:
        missing = [p for p in (tls.cert_file, tls.key_file) if not os.path.exists(p)]
        if missing and tls.self_signed:
            for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
                fault = _writable(path)
                if fault:
                    faults.append(ConfigError(f"server.tls.{key}",
                                              f"self_signed cannot create {path}: {fault} for {whoami()}"))
        else:
            for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
                fault = _readable(path)
                if fault:
                    faults.append(ConfigError(f"server.tls.{key}", f"cannot read {path}: {fault} for {whoami()}"))
            if not faults:
                from ccproxy.tls import certificate_options

                try:
                    certificate_options(tls)
                except ConfigError as e:
                    faults.append(e)
    audit = config.audit
    for i, output in enumerate(audit.outputs if audit.enabled else ()):
        at = f"security.audit.outputs[{i}]"
        if isinstance(output, FileOutput):
            fault = _writable(output.path)
            if fault:
                faults.append(ConfigError(f"{at}.path", f"cannot write {output.path}: {fault} for {whoami()}"))
        elif isinstance(output, SyslogOutput):
            fault = _writable(output.spool_path)
            if fault:
                faults.append(ConfigError(f"{at}.spool_path",
                                          f"cannot write {output.spool_path}: {fault} for {whoami()}"))
    return faults


def _readable(path: str) -> str | None:
    try:
        os.stat(path)
    except PermissionError:  # a folder on the way the user cannot search: the file is not "missing"
        return "permission denied"
    except OSError:
        return "no such file" if os.path.isdir(os.path.dirname(path) or ".") else "no such file or directory"
    if os.path.isdir(path):
        return "is a directory"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _writable(path: str) -> str | None:
    """Why `path` could not be created or appended to (its missing parents created), or None."""
    if os.path.exists(path):
        if os.path.isdir(path):
            return "is a directory"
        return None if os.access(path, os.W_OK) else "permission denied"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return None
