"""Per-interval inference aggregates and this process's resource use (thread-safe).

Telemetry leaves the device as one aggregate per interval with a mergeable latency histogram,
never one message per inference. CPU and memory come from ``/proc/self`` (no psutil); where
``/proc`` is missing (macOS) they are ``None``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from sdk.protocol import histogram
from sdk.protocol.messages import Telemetry


def _cpu_seconds() -> float | None:
    """User + system CPU time of this process, from /proc/self/stat."""
    try:
        with open("/proc/self/stat", "rb") as f:
            raw = f.read().decode()
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        fields = raw[raw.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the file)
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes() -> int | None:
    """Resident set size of this process, from /proc/self/statm."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Aggregator:
    """Counts inferences of the current interval; ``snapshot`` returns them and starts anew."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._reset(clock(), _cpu_seconds())

    def _reset(self, now: float, cpu: float | None) -> None:
        self._start, self._cpu_start = now, cpu
        self._count = self._errors = 0
        self._hist = histogram.empty()
        self._sum_ms = 0.0

    def record_ok(self, latency_ms: float) -> None:
        with self._lock:
            self._count += 1
            self._hist[histogram.bucket_of(latency_ms)] += 1
            self._sum_ms += max(0.0, latency_ms)

    def record_error(self) -> None:
        with self._lock:
            self._count += 1
            self._errors += 1

    def snapshot(self, seq: int, artifact: str | None = None, model_version: str | None = None) -> Telemetry:
        now, cpu = self._clock(), _cpu_seconds()
        with self._lock:
            interval = max(0.0, now - self._start)
            cpu_pct = None
            if cpu is not None and self._cpu_start is not None and interval > 0:
                cpu_pct = round(max(0.0, cpu - self._cpu_start) / interval * 100.0, 2)
            msg = Telemetry(seq=seq, interval_s=round(interval, 3), count=self._count,
                            errors=self._errors, latency_hist=list(self._hist),
                            latency_sum_ms=round(self._sum_ms, 3), cpu_percent=cpu_pct,
                            rss_bytes=rss_bytes(), artifact=artifact, model_version=model_version)
            self._reset(now, cpu)
        return msg
