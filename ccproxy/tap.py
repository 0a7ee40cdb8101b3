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
        try:
            self["parsed"] = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"invalid config {self['config']}: {e}") from None


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
