"""Helpers for the audit trail's in-process tests: a trail on a task.Clock, its records read back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task

from ccproxy.audit import AuditTrail
from ccproxy.config._reader import Section
from ccproxy.config.audit import AuditConfig
from ccproxy.config.privacy import PrivacyConfig
from ccproxy.config.server import UpstreamsConfig

BASE_TIME = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@attrs.frozen
class Config:
    """The parts of the root config the trail reads (the rest belongs to other concerns)."""

    audit: AuditConfig
    upstreams: UpstreamsConfig
    privacy: PrivacyConfig = attrs.Factory(PrivacyConfig)


class Holder:
    def __init__(self, config: Config) -> None:
        self.current = Runtime(config)


class Runtime:
    def __init__(self, config: Config) -> None:
        self.config = config


def sync(work: Callable[[], Any]) -> defer.Deferred[Any]:
    return defer.maybeDeferred(work)


def config(audit: dict[str, Any], **extra: Any) -> Config:
    data: dict[str, Any] = {"security": {"audit": audit}}
    for key, value in extra.items():
        data.setdefault(key, {}).update(value)
    root = Section(data, "")
    config = Config(audit=AuditConfig.parse(root), upstreams=UpstreamsConfig.parse(root.section("upstreams")),
                    privacy=PrivacyConfig.parse(root))
    root.done()
    return config


class Harness:
    """A trail observing the global log publisher, on a fake clock, with file outputs in `tmp`."""

    def __init__(self, tmp: Path, audit: dict[str, Any] | None = None, start: float = BASE_TIME,
                 **extra: Any) -> None:
        self.tmp = tmp
        self.path = tmp / "audit.log"
        audit = audit if audit is not None else {"outputs": [{"type": "file", "path": str(self.path)}]}
        self.clock = task.Clock()
        self.clock.advance(start)
        self.holder = Holder(config(audit, **extra))
        self.trail = AuditTrail(self.holder, self.clock, run_in_thread=sync).start()

    def reload(self, audit: dict[str, Any], **extra: Any) -> None:
        self.holder.current = Runtime(config(audit, **extra))

    def records(self, path: Path | None = None) -> list[dict[str, Any]]:
        self.clock.advance(1.0)  # past the flush interval
        target = path or self.path
        return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.trail.stop()
