"""Pure fleet-health math (no database): merge aggregates, percentiles, availability, accuracy,
drift. ``Store.fleet_health`` fetches rows and hands them to these functions; tests check them
against values computed independently from raw rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from sdk.protocol import drift, histogram

QUANTILES = {"p50_ms": 0.5, "p95_ms": 0.95, "p99_ms": 0.99}


@dataclass
class Tele:
    """Summed telemetry of any set of intervals."""

    intervals: int = 0
    count: int = 0
    errors: int = 0
    latency_sum_ms: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(histogram.N_BUCKETS, dtype=np.int64))

    def add(self, other: Tele) -> None:
        self.intervals += other.intervals
        self.count += other.count
        self.errors += other.errors
        self.latency_sum_ms += other.latency_sum_ms
        self.hist = self.hist + other.hist

    def summary(self) -> dict[str, Any]:
        ok = self.count - self.errors
        counts = self.hist.tolist()
        out: dict[str, Any] = {"inferences": self.count, "errors": self.errors,
                               "error_rate": self.errors / self.count if self.count else None,
                               "mean_ms": self.latency_sum_ms / ok if ok > 0 else None}
        out.update({k: histogram.quantile(counts, q) for k, q in QUANTILES.items()})
        return out


def merged(parts: Iterable[Tele]) -> Tele:
    total = Tele()
    for p in parts:
        total.add(p)
    return total


@dataclass
class Avail:
    """Availability of one device (or a sum of devices) over a window."""

    span_s: float = 0.0
    uptime_s: float = 0.0
    outages: int = 0

    def add(self, other: Avail) -> None:
        self.span_s += other.span_s
        self.uptime_s += other.uptime_s
        self.outages += other.outages

    def summary(self) -> dict[str, Any]:
        down = max(0.0, self.span_s - self.uptime_s)
        return {"availability": min(1.0, self.uptime_s / self.span_s) if self.span_s > 0 else None,
                "uptime_s": round(self.uptime_s, 3), "downtime_s": round(down, 3), "outages": self.outages,
                "mtbf_s": round(self.uptime_s / self.outages, 3) if self.outages else None,
                "mttr_s": round(down / self.outages, 3) if self.outages else None}


def availability(sessions: Sequence[tuple[datetime, datetime | None]], first_seen: datetime,
                 since: datetime, now: datetime) -> Avail:
    """Coverage of [max(since, first_seen), now] by connection sessions; an outage is a session
    that ended inside the window (last will, timeout, or a reconnect on a new connection)."""
    from .store import covered_seconds

    start = max(since, first_seen)
    span = max(0.0, (now - start).total_seconds())
    covered = covered_seconds(((a, b or now) for a, b in sessions), start, now) if span > 0 else 0.0
    outages = sum(1 for _, b in sessions if b is not None and since <= b <= now)
    return Avail(span, covered, outages)


def performance(by_label: dict[int, list[int]]) -> dict[str, Any]:
    """Accuracy and macro recall from {true label: [correct, total]} of labelled predictions."""
    total = sum(t for _, t in by_label.values())
    if total == 0:
        return {"labelled": 0, "accuracy": None, "recall": None}
    correct = sum(c for c, _ in by_label.values())
    recalls = [c / t for c, t in by_label.values() if t]
    return {"labelled": total, "accuracy": correct / total, "recall": sum(recalls) / len(recalls)}


def add_labels(into: dict[int, list[int]], other: dict[int, list[int]]) -> None:
    for label, (c, t) in other.items():
        acc = into.setdefault(label, [0, 0])
        acc[0] += c
        acc[1] += t


def drift_psi(summary: dict[str, Sequence[int]] | None, baseline: dict[str, Sequence[int]] | None) -> dict[str, Any]:
    """PSI of each drift field against the baseline; ``drift`` is True above ``PSI_DRIFT``."""
    if summary is None or baseline is None:
        return {"drift_psi": None, "drift": None}
    per = {f: drift.psi(baseline[f], summary[f]) for f in drift.FIELDS}
    known = [v for v in per.values() if v is not None]
    worst = max(known) if known else None
    return {"drift_psi": round(worst, 4) if worst is not None else None,
            "drift": (worst > drift.PSI_DRIFT) if worst is not None else None,
            "drift_fields": {f: (round(v, 4) if v is not None else None) for f, v in per.items()}}


#: Sums of ``Telemetry.stage`` (see ``messages.STAGE_SUMS``) and the counts they are over.
STAGE_SUMS = ("transfer_ms", "wait_ms", "compute_ms", "forward_ms")


@dataclass
class StageAcc:
    """Summed ``Telemetry.stage`` of a device (or of a stage's replicas) over a window."""

    count: int = 0
    errors: int = 0
    timed: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGE_SUMS, 0.0))

    def add(self, count: int, errors: int, timed: int, sums: dict[str, float]) -> None:
        self.count += count
        self.errors += errors
        self.timed += timed
        for k in STAGE_SUMS:
            self.sums[k] += sums[k]

    def summary(self) -> dict[str, Any]:
        """Requests, errors, and mean ms per request: transfer over the timed ones, the rest over
        the successful ones (None when there were none)."""
        ok = self.count - self.errors
        out: dict[str, Any] = {"requests": self.count, "errors": self.errors}
        for k in STAGE_SUMS:
            n = self.timed if k == "transfer_ms" else ok
            out[k] = round(self.sums[k] / n, 4) if n > 0 else None
        return out


def stage_health(rows: Iterable[tuple[str, str, int, int, int, int, int, dict[str, float]]]
                 ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """From (device, service, stage, stages, count, errors, timed, sums) per device and role:

    * per device, its busiest role in the window with mean times (``fleet health`` row ``stage``);
    * per service, its stages with their replicas and mean times, and the **bottleneck**: the
      stage with the most compute per replica (the one that limits throughput); queueing
      (``wait_ms``) grows in front of it.
    """
    per_role: dict[tuple[str, str, int, int], StageAcc] = {}
    for d, svc, stage, stages, count, errors, timed, sums in rows:
        per_role.setdefault((d, svc, stage, stages), StageAcc()).add(count, errors, timed, sums)
    devices: dict[str, dict[str, Any]] = {}
    best: dict[str, int] = {}
    services: dict[str, dict[tuple[int, int], tuple[StageAcc, set[str]]]] = {}
    for (d, svc, stage, stages), acc in sorted(per_role.items()):
        if acc.count > best.get(d, -1):
            best[d] = acc.count
            devices[d] = {"service": svc, "stage": stage, "stages": stages, **acc.summary()}
        merged_acc, devs = services.setdefault(svc, {}).setdefault((stage, stages), (StageAcc(), set()))
        merged_acc.add(acc.count, acc.errors, acc.timed, acc.sums)
        devs.add(d)
    out = []
    for svc, by_stage in sorted(services.items()):
        rows_ = [{"stage": stage, "stages": stages, "replicas": len(devs), "devices": sorted(devs), **acc.summary()}
                 for (stage, stages), (acc, devs) in sorted(by_stage.items())]
        timed = [r for r in rows_ if r["compute_ms"] is not None]
        worst = max(timed, key=lambda r: (r["compute_ms"] / r["replicas"], r["wait_ms"] or 0.0)) if timed else None
        for r in rows_:
            r["bottleneck"] = r is worst and len(rows_) > 1
        out.append({"service": svc, "stages": rows_, "bottleneck": worst["stage"] if worst else None})
    return devices, out
