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
