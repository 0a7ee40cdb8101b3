"""One set of metrics for a supervisor and its workers: each worker's figures, summed.

Each worker counts exactly as one process does (ccproxy.metrics: plain numbers on the request
path, turned into metrics only when collected). The supervisor asks every worker for its
collected families over the control channel when it is scraped, and each worker also sends them
on its own every `PUSH_EVERY` seconds. `Merged` keeps the last figures of each worker process;
when a process ends, its counters and histograms are added to a retired total, so the sums never
go back when a worker is replaced (what a worker killed outright counted after its last report, at
most `PUSH_EVERY` seconds, is lost with it).

Why not prometheus_client's multiprocess mode: it keeps every value in a shared file behind a
lock, which is the per-observation cost `ccproxy.metrics.HotFigures` exists to avoid, and it does
not carry collectors that read live state at scrape time (`ccproxy.metrics.Sources`).

Merging: counters and histograms (same buckets in every worker) are summed, `_created` takes the
earliest; gauges follow `GAUGES` (summed, lowest, or the same in every worker). Label values are
those the workers bounded, bounded again here across workers and restarts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from ccproxy.metrics import Bounded

PUSH_EVERY = 1.0
# How long a scrape waits for the workers' answers; a worker that has not answered by then is
# shown with the figures it last sent.
ASK_TIMEOUT = 2.0
# Processes that ended whose last figures are kept, to count what a late message adds.
_GONE_KEPT = 16

SUM, LOWEST, SAME, OWN = "sum", "lowest", "same", "own"
# Gauges of the workers, and how several become one. OWN: the supervisor's value alone (it keeps
# the blocks and the emergency switch). A gauge not listed is taken as the same in every worker.
GAUGES = {
    "ccproxy_connections_open": SUM,
    "ccproxy_audit_queue_depth": SUM,
    "ccproxy_state_backend_up": LOWEST,
    "ccproxy_blocked_ips": OWN,
    "ccproxy_emergency_mode": OWN,
}

Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels
Family = tuple[str, str, str]  # name, type, help


def collect(collectors: Iterable[Any], process: bool = False) -> list[list[Any]]:
    """The families of `collectors` (e.g. a CollectorRegistry) as JSON values:
    `[name, type, help, [[sample, labels, value], ...]]`; `process_*` only when `process`."""
    out = []
    for collector in collectors:
        for family in collector.collect():
            if not process and family.name.startswith("process_"):
                continue
            out.append([family.name, family.type, family.documentation,
                        [[s.name, dict(s.labels), float(s.value)] for s in family.samples]])
    return out


class _Registry:
    """A CollectorRegistry as `collect` takes it (its collectors in one)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        return self.registry.collect()


def of_registry(registry: Any, process: bool = False) -> list[list[Any]]:
    return collect([_Registry(registry)], process)


class Merged:
    """The figures of every worker process, by pid, and what ended processes counted."""

    def __init__(self) -> None:
        self.live: dict[int, list[list[Any]]] = {}
        self.gone: dict[int, list[list[Any]]] = {}
        self.retired: dict[Key, float] = {}
        self.families: dict[str, Family] = {}
        self._bounds: dict[tuple[str, str], Bounded] = {}

    def update(self, pid: int, families: Any) -> None:
        if not isinstance(families, list):
            return
        if pid in self.gone:
            # Sent before the process ended, read after: what it adds over its last figures counts.
            before = self._counted(self.gone[pid])
            for key, value in self._counted(families).items():
                gained = value - before.get(key, 0.0)
                if gained > 0:
                    self._add_retired(key, gained)
            self.gone[pid] = families
            return
        self.live[pid] = families

    def ended(self, pid: int | None) -> None:
        """A worker process is gone: its counts stay in the sums."""
        if pid is None or pid in self.gone:
            return
        families = self.live.pop(pid, [])  # none yet: whatever it sent counts when it is read
        for family in families:
            self._learn(family)
        for key, value in self._counted(families).items():
            self._add_retired(key, value)
        self.gone[pid] = families
        while len(self.gone) > _GONE_KEPT:
            del self.gone[next(iter(self.gone))]

    def _add_retired(self, key: Key, value: float) -> None:
        _add(self.retired, key, value)

    def _learn(self, family: list[Any]) -> None:
        name, kind, doc = str(family[0]), str(family[1]), str(family[2])
        self.families.setdefault(name, (name, kind, doc))

    def metrics(self, own: list[list[Any]] | None = None) -> list[Metric]:
        """One family per name: the live workers' figures with the retired counts, and `own`
        (the supervisor's) added as one more process."""
        sums: dict[Key, float] = {}
        gauges: dict[Key, list[float]] = {}
        order: dict[str, dict[Key, None]] = {}
        own = own or []
        for families in [*self.live.values(), own]:
            for family in families:
                self._learn(family)
                name, kind = str(family[0]), str(family[1])
                mode = GAUGES.get(name, SAME) if kind == "gauge" else SUM
                if mode == OWN and families is not own:
                    continue
                seen = order.setdefault(name, {})
                for sample, labels, value in family[3]:
                    key = self._key(name, kind, str(sample), labels)
                    seen[key] = None
                    if kind == "gauge":
                        gauges.setdefault(key, []).append(float(value))
                    else:
                        _add(sums, key, float(value))
        for key, value in self.retired.items():
            of = _family_of(key[0], self.families)
            if of is not None:
                order.setdefault(of, {})[key] = None
                _add(sums, key, value)
        out = []
        for name, keys in order.items():
            _, kind, doc = self.families[name]
            metric = Metric(name, doc, kind)
            mode = GAUGES.get(name, SAME)
            for key in keys:
                if kind == "gauge":
                    values = gauges[key]
                    value = sum(values) if mode == SUM else min(values) if mode == LOWEST else max(values)
                else:
                    value = sums[key]
                metric.add_sample(key[0], dict(key[1]), value)
            out.append(metric)
        return out

    def _counted(self, families: list[list[Any]]) -> dict[Key, float]:
        """The counter and histogram samples of one process (what must survive it)."""
        out: dict[Key, float] = {}
        for family in families:
            name, kind = str(family[0]), str(family[1])
            if kind in ("counter", "histogram"):
                for sample, labels, value in family[3]:
                    _add(out, self._key(name, kind, str(sample), labels), float(value))
        return out

    def _key(self, family: str, kind: str, sample: str, labels: Any) -> Key:
        pairs = sorted((str(k), str(v)) for k, v in dict(labels).items())
        if kind != "gauge":
            # Each worker bounds its label values; across workers and their successors the union
            # is bounded again. `le` (histogram buckets) is fixed by the code.
            pairs = [(k, v if k == "le" else self._bound(family, k)(v)) for k, v in pairs]
        return sample, tuple(pairs)

    def _bound(self, family: str, label: str) -> Bounded:
        bound = self._bounds.get((family, label))
        if bound is None:
            bound = self._bounds[(family, label)] = Bounded()
        return bound


def _add(sums: dict[Key, float], key: Key, value: float) -> None:
    if key[0].endswith("_created"):
        sums[key] = min(sums.get(key, value), value)
    else:
        sums[key] = sums.get(key, 0.0) + value


def _family_of(sample: str, families: dict[str, Family]) -> str | None:
    for suffix in ("", "_total", "_created", "_bucket", "_count", "_sum"):
        if suffix and not sample.endswith(suffix):
            continue
        name = sample[: len(sample) - len(suffix)] if suffix else sample
        if name in families:
            return name
    return None


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def exposition(families: list[Metric]) -> bytes:
    """The Prometheus text format of `families`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
