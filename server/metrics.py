"""Prometheus text exposition for ``GET /metrics`` (format 0.0.4, written by hand: a handful of
gauges and counters do not need a client library).

Server counters come from the ingest worker; per-device gauges from ``fleet_health`` over the
last hour (served from raw aggregates), so a scrape costs one health query.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WINDOW_S = 3600.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line(name: str, value: float | None, labels: dict[str, str] | None = None) -> str | None:
    if value is None:
        return None
    lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in (labels or {}).items())
    return f"{name}{{{lab}}} {float(value):.10g}" if lab else f"{name} {float(value):.10g}"


def render(info: dict[str, Any], health: dict[str, Any]) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[float | None, dict[str, str] | None]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(x for x in (_line(name, v, lab) for v, lab in samples) if x is not None)

    ingest = info.get("ingest", {})
    metric("edgectl_telemetry_stored_total", "counter", "Telemetry aggregates stored since the server started.",
           [(ingest.get("telemetry_stored", 0), None)])
    metric("edgectl_heartbeats_total", "counter", "Heartbeats ingested since the server started.",
           [(ingest.get("heartbeats", 0), None)])
    metric("edgectl_rejected_total", "counter", "Device messages refused, by reason.",
           [(n, {"reason": r}) for r, n in sorted(info.get("rejected", {}).items())])
    metric("edgectl_ingest_queue_depth", "gauge", "Messages waiting for the ingest worker.",
           [(info.get("queue_depth", 0), None)])
    devices = health["devices"]
    metric("edgectl_devices", "gauge", "Known devices by connection state.",
           [(sum(1 for d in devices if d["online"]), {"state": "online"}),
            (sum(1 for d in devices if not d["online"]), {"state": "offline"})])

    def per_device(name: str, key: str, help_: str, kind: str = "gauge") -> None:
        metric(name, kind, help_, [(d.get(key), {"device": d["id"], "group": d.get("group") or ""})
                                   for d in devices])

    metric("edgectl_device_up", "gauge", "1 while the device has an open connection session.",
           [(1.0 if d["online"] else 0.0, {"device": d["id"], "group": d.get("group") or ""}) for d in devices])
    per_device("edgectl_device_availability_ratio", "availability", "Fraction of the last hour the device was connected.")
    per_device("edgectl_device_inferences_1h", "inferences", "Inferences in the last hour.")
    per_device("edgectl_device_errors_1h", "errors", "Failed inferences in the last hour.")
    per_device("edgectl_device_latency_p50_ms", "p50_ms", "Median device-side latency over the last hour (ms).")
    per_device("edgectl_device_latency_p95_ms", "p95_ms", "95th percentile latency over the last hour (ms).")
    per_device("edgectl_device_latency_p99_ms", "p99_ms", "99th percentile latency over the last hour (ms).")
    per_device("edgectl_device_restarts_1h", "restarts", "Agent restarts seen in the last hour.")
    per_device("edgectl_device_drift_psi", "drift_psi", "Largest population stability index of inputs/outputs vs the baseline.")
    return "\n".join(out) + "\n"
