"""`twistd ccproxy`: options are checked in postOptions, the service built in makeService."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from ccproxy.config import ConfigError, load

DEFAULT_CONFIG = "/etc/ccproxy/config.yaml"


class Options(usage.Options):
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Path to the YAML config file."],
        ["log-format", None, "auto", "journal (sd-daemon <N> priority prefixes on stdout, for systemd), "
         "text, or auto: journal when stdout is the journal's stream ($JOURNAL_STREAM). "
         "twistd's --syslog logs to syslog instead (facility daemon, with the PID)."],
    ]

    def postOptions(self) -> None:
        from ccproxy import logs, preflight

        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(logs.FORMATS)}")
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            # twistd's own observers neither escape nor grade lines; ours do. twistd reads this
            # option (a name to import) once every option is parsed.
            prefix = parent.get("prefix")
            logfile = parent.get("logfile") or ""
            if logfile == "-" or (not logfile and parent.get("nodaemon")):
                logfile = ""  # standard output
            elif not logfile:
                logfile = "twistd.log"  # where a daemonised twistd logs by default
            logs.choose(self["log-format"], bool(parent.get("syslog")), None if prefix == "twisted" else prefix,
                        logfile or None)
            parent["logger"] = "ccproxy.logs.observer"
        try:
            config = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError("\n".join(f"invalid config {self['config']}: {logs.escape(str(fault))}"
                                             for fault in e.faults)) from None
        # Files this user must read or write: refused now, in one line each, not by a traceback later.
        faults = preflight.check(config)
        if faults:
            raise usage.UsageError("\n".join(f"unusable config {self['config']}: {e}" for e in faults))
        self["parsed"] = config


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from ccproxy.service import ProxyService
    from ccproxy.workers.worker import is_worker

    config = options["parsed"]
    if config.server.workers > 1 and not is_worker():
        from ccproxy.workers.supervisor import Supervisor

        supervisor: Any = Supervisor(options["config"], config, reactor)
        return supervisor
    service: Any = ProxyService(options["config"], config, reactor)
    return service
