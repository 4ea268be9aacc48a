"""Rollouts from the workstation: the ``push`` options that make a deployment a gated rollout
(canary, waves, soak, ``--gate NAME=VALUE``) turned into the API's ``strategy`` and ``gates``,
and waiting for a rollout to end. Pure parsing plus an HTTP poll; no server code."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from .client import ServerClient
from .protocol import EdgeError

FINAL_PHASES = ("completed", "rolled_back", "aborted", "superseded")

#: ``--gate`` names -> (Gates field, kind): "ratio" takes 5% or 0.05, "ms" milliseconds, "int" a count.
GATES: dict[str, tuple[str, str]] = {
    "p95": ("max_p95_regression", "ratio"),
    "p95_floor": ("min_p95_increase_ms", "ms"),
    "p95_confidence": ("p95_confidence", "ratio"),
    "errors": ("max_error_rate", "ratio"),
    "error_increase": ("max_error_rate_increase", "ratio"),
    "availability": ("min_availability", "ratio"),
    "accuracy": ("min_accuracy", "ratio"),
    "accuracy_drop": ("max_accuracy_drop", "ratio"),
    "install_failures": ("max_install_failure_ratio", "ratio"),
    "min_inferences": ("min_inferences", "int"),
}
#: Gates that cannot be switched off (a number is always needed).
ALWAYS_ON = ("min_p95_increase_ms", "max_install_failure_ratio", "min_inferences")
GATE_HELP = ("p95=+20% | p95_floor=0.5ms | p95_confidence=95% | errors=5% | error_increase=+2% | availability=90% | accuracy=90% | "
             "accuracy_drop=2% | install_failures=0% | min_inferences=20; 'off' disables a gate")


def parse_size(text: str, what: str) -> float:
    """A wave size: a device count (``2``) or a share of the targets (``10%``)."""
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", t)
    if m:
        share = float(m.group(1)) / 100
        if not 0 < share < 1:
            raise EdgeError(f"{what} {text!r}: a share must be between 0% and 100% (exclusive)")
        return share
    if t.isdigit():
        return float(int(t))
    raise EdgeError(f"{what} {text!r} must be a device count (e.g. 1) or a share (e.g. 10%)")


def parse_seconds(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|[smh]?)\s*", text)
    if not m:
        raise EdgeError(f"{what} {text!r} must be a duration such as 90s, 2m or 1h")
    return float(m.group(1)) * {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _ratio(value: str, name: str) -> float:
    t = value.strip().lstrip("+")
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise EdgeError(f"--gate {name}={value!r}: expected a percentage such as 20% or a fraction such as 0.2") from None


def parse_gates(specs: list[str]) -> dict[str, Any]:
    """``["p95=+20%", "errors=off"]`` -> the API's ``gates`` fields (only those given)."""
    out: dict[str, Any] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        key = name.strip().lower().replace("-", "_")
        if not sep or key not in GATES:
            raise EdgeError(f"--gate {spec!r}: expected NAME=VALUE with NAME one of {', '.join(GATES)} ({GATE_HELP})")
        field, kind = GATES[key]
        value = value.strip()
        if value.lower() in ("off", "none"):
            if field in ALWAYS_ON:
                raise EdgeError(f"--gate {key} cannot be switched off; give a number")
            out[field] = None
        elif kind == "int":
            if not value.isdigit():
                raise EdgeError(f"--gate {key}={value!r}: expected a whole number")
            out[field] = int(value)
        elif kind == "ms":
            out[field] = parse_seconds(value if value.endswith(("ms", "s")) else value + "ms", f"--gate {key}") * 1000
        else:
            out[field] = _ratio(value, key)
    return out


def rollout_options(*, canary: str | None, waves: str | None, soak: str | None, install_timeout: str | None,
                    gates: list[str] | None, all_at_once: bool, latency_slo: str | None = None,
                    downgrade: bool = False) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The API's ``strategy`` and ``gates`` from ``push`` options; (None, None) when none is given
    (a plain deployment, all devices at once and ungated)."""
    given = any(v is not None for v in (canary, waves, soak, install_timeout, latency_slo)) or bool(gates) \
        or all_at_once or downgrade
    if not given:
        return None, None
    if downgrade and latency_slo is None:
        raise EdgeError("--downgrade needs --latency-slo (the p95 a device class must meet, e.g. 20ms)")
    if all_at_once and (canary is not None or waves is not None):
        raise EdgeError("--all-at-once cannot be combined with --canary or --waves")
    strategy: dict[str, Any] = {}
    if all_at_once:
        strategy.update(canary=0, waves=[])
    if canary is not None:
        strategy["canary"] = parse_size(canary, "--canary")
    if waves is not None:
        strategy["waves"] = [parse_size(w, "--waves") for w in waves.split(",") if w.strip()]
    if soak is not None:
        strategy["soak_s"] = parse_seconds(soak, "--soak")
    if install_timeout is not None:
        strategy["install_timeout_s"] = parse_seconds(install_timeout, "--install-timeout")
    if latency_slo is not None:
        strategy["latency_slo_ms"] = parse_seconds(latency_slo if latency_slo.endswith(("ms", "s")) else latency_slo + "ms",
                                                   "--latency-slo") * 1000
        strategy["downgrade"] = downgrade
    return strategy, parse_gates(gates or [])


def wait_rollout(client: ServerClient, rollout_id: str, timeout_s: float, *, poll_s: float = 0.5,
                 on_update: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], bool]:
    """Poll until the rollout ends (completed, rolled back, aborted, superseded) or time is up;
    returns (its last view, True if it ended)."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = client.rollout(rollout_id)
        if on_update is not None:
            on_update(view)
        if view["phase"] in FINAL_PHASES:
            return view, True
        if time.monotonic() > deadline:
            return view, False
        time.sleep(poll_s)
