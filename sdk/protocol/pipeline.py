"""Running a pipeline across devices: tensors between stages and the per-request trace.

Shared by the host reference (:func:`sdk.partition.run_pipeline`), the agents and the client, so
all three convert tensors and read timings the same way.

**Tensors between stages.** A stage may take or give int8 (``partition --quantize int8``); the
manifest's ``pipeline`` records every stage's input/output spec with its quantization
``[scale, zero_point]``, and the whole pipeline's ``input`` / ``output`` (float32, like the
whole model). :func:`adapt` turns a tensor of one spec into another: the client's float input
into stage 1's int8 input, stage k's int8 output into stage k+1's input (requantized, because
each stage was calibrated on its own), and the last stage's output back into float. It is the
identity between float stages.

**Trace.** A request travels with MQTT v5 user properties: ``edgectl-sent`` is the wall-clock
time (seconds since the epoch) at which the previous hop published it, and every stage that ran
adds one ``edgectl-stage`` property (JSON: stage, device, transfer_ms, wait_ms, compute_ms). The
last stage copies them onto its answer, so the caller sees where the time went. Transfer time
compares two devices' wall clocks: exact on one host, as good as NTP across boards.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .errors import ModelInputError

SENT = "edgectl-sent"
STAGE = "edgectl-stage"
#: Most trace entries copied from a request (a pipeline has at most 64 stages).
MAX_TRACE = 64


def _scale_zero(spec: dict[str, Any]) -> tuple[float, int]:
    q = spec.get("quantization") or [0.0, 0]
    return float(q[0]), int(q[1])


def adapt(x: np.ndarray, src: dict[str, Any], dst: dict[str, Any]) -> np.ndarray:
    """Convert ``x`` (described by spec ``src``) to what spec ``dst`` expects.

    Only a tensor whose dtype is ``src``'s is converted; anything else is passed through
    unchanged, so the model's own input check reports a wrong dtype in its usual words.
    """
    s_dtype, d_dtype = np.dtype(src["dtype"]), np.dtype(dst["dtype"])
    if x.dtype != s_dtype:
        return x
    s_scale, s_zero = _scale_zero(src)
    d_scale, d_zero = _scale_zero(dst)
    if s_dtype == d_dtype and (s_dtype.kind == "f" or (s_scale, s_zero) == (d_scale, d_zero)):
        return x
    if s_dtype.kind == "f":
        real = x.astype(np.float32)
    elif s_scale > 0:
        real = (x.astype(np.float32) - s_zero) * s_scale
    else:
        raise ModelInputError(f"cannot convert a {s_dtype} tensor without quantization parameters to {d_dtype}")
    if d_dtype.kind == "f":
        return real.astype(d_dtype)
    if d_scale <= 0:
        raise ModelInputError(f"cannot convert to {d_dtype}: the next stage's input has no quantization parameters")
    info = np.iinfo(d_dtype)
    return np.clip(np.round(real / d_scale + d_zero), info.min, info.max).astype(d_dtype)


def stage_entry(stage: int, device: str, transfer_ms: float | None, wait_ms: float, compute_ms: float) -> tuple[str, str]:
    """One ``edgectl-stage`` user property."""
    body = {"stage": stage, "device": device, "wait_ms": round(wait_ms, 4), "compute_ms": round(compute_ms, 4)}
    if transfer_ms is not None:
        body["transfer_ms"] = round(transfer_ms, 4)
    return STAGE, json.dumps(body, separators=(",", ":"))


def user_properties(props: Any) -> list[tuple[str, str]]:
    """The (key, value) user properties of a paho Properties object (empty when absent)."""
    values = getattr(props, "UserProperty", None) if props is not None else None
    if not isinstance(values, list):
        return []
    return [(str(k), str(v)) for k, v in values if isinstance(k, str) and isinstance(v, str)][: MAX_TRACE + 8]


def sent_at(pairs: list[tuple[str, str]]) -> float | None:
    """The ``edgectl-sent`` time of a request, if it carries a sane one."""
    for k, v in pairs:
        if k == SENT:
            try:
                t = float(v)
            except ValueError:
                return None
            return t if math.isfinite(t) and t > 0 else None
    return None


def trace_of(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The stage entries of a request or answer, in order; malformed entries are skipped."""
    out = []
    for k, v in pairs:
        if k != STAGE:
            continue
        try:
            entry = json.loads(v)
        except ValueError:
            continue
        if (isinstance(entry, dict) and isinstance(entry.get("stage"), int)
                and all(isinstance(entry.get(f, 0), (int, float)) and not isinstance(entry.get(f, 0), bool)
                        for f in ("transfer_ms", "wait_ms", "compute_ms"))):
            out.append(entry)
    return out[:MAX_TRACE]
