"""`twistd ccproxy`: options are checked in postOptions, the service built in makeService."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from ccproxy.config import ConfigError, load

DEFAULT_CONFIG = "/etc/ccproxy/config.yaml"


class Options(usage.Options):
    optParameters = [["config", "c", DEFAULT_CONFIG, "Path to the YAML config file."]]

    def postOptions(self) -> None:
        from ccproxy import preflight

        try:
            config = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"invalid config {self['config']}: {e}") from None
        # Files this user must read or write: refused now, in one line each, not by a traceback later.
        faults = preflight.check(config)
        if faults:
            raise usage.UsageError("\n".join(f"unusable config {self['config']}: {e}" for e in faults))
        self["parsed"] = config


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from ccproxy.service import ProxyService

    service: Any = ProxyService(options["config"], options["parsed"], reactor)
    return service
