"""Input/output drift summaries: fixed bins shared by agent and server, and the PSI.

An agent summarises each telemetry interval's traffic in three histograms with fixed bins, so
summaries from any devices and intervals add up bucket by bucket (like latency histograms):

* ``input_mean`` and ``input_std``: per request, the mean and the standard deviation of the
  input tensor, binned on a symmetric-log scale ``asinh(10·v)`` with ``N_BINS`` bins over
  [-LIMIT, LIMIT] (values beyond fall in the first/last bin). Near zero a bin is ≈ 0.025 wide,
  at 10 it is ≈ 2.5 wide: unit-scaled and raw-pixel inputs both get useful resolution.
* ``outputs``: for a classifier (last output axis > 1) the predicted class (argmax, classes
  ≥ N_BINS-1 share the last bin); for any other model the output mean on the same scale.

The server compares the merged histograms of a window with the artifact's baseline by the
population stability index (PSI); ``PSI_DRIFT`` is the usual "significant shift" threshold.
Pure numpy: the agent imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

N_BINS = 48
LIMIT = 6.0
FIELDS = ("input_mean", "input_std", "outputs")
#: PSI above this is reported as drift (0.1-0.25: moderate shift; > 0.25: significant).
PSI_DRIFT = 0.25
_EDGES = np.linspace(-LIMIT, LIMIT, N_BINS + 1)[1:-1]


def empty() -> dict[str, list[int]]:
    return {f: [0] * N_BINS for f in FIELDS}


def bin_values(values: np.ndarray) -> np.ndarray:
    """Bin indexes (0..N_BINS-1) of ``values`` on the asinh(10·v) scale; NaN goes to bin 0."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    return np.searchsorted(_EDGES, np.arcsinh(10.0 * v), side="right")


def summarize(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-field bin counts for one request batch: input ``x`` (batch first) and output ``y``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    out = {
        "input_mean": np.bincount(bin_values(rows.mean(axis=1)), minlength=N_BINS),
        "input_std": np.bincount(bin_values(rows.std(axis=1)), minlength=N_BINS),
    }
    if y.ndim >= 1 and y.shape[-1] > 1:
        classes = np.minimum(np.argmax(y.reshape(-1, y.shape[-1]), axis=1), N_BINS - 1)
        out["outputs"] = np.bincount(classes, minlength=N_BINS)
    else:
        yr = y.astype(np.float64).reshape(max(1, y.shape[0] if y.ndim else 1), -1)
        out["outputs"] = np.bincount(bin_values(yr.mean(axis=1)), minlength=N_BINS)
    return out


def merge(summaries: Iterable[dict[str, Sequence[int]]]) -> dict[str, list[int]]:
    total = {f: np.zeros(N_BINS, dtype=np.int64) for f in FIELDS}
    for s in summaries:
        for f in FIELDS:
            total[f] += np.asarray(s[f], dtype=np.int64)
    return {f: [int(c) for c in v] for f, v in total.items()}


def psi(expected: Sequence[int], actual: Sequence[int], eps: float = 1e-4) -> float | None:
    """Population stability index of ``actual`` against ``expected``; None if either is empty.

    Both are normalised to proportions; empty bins get ``eps`` so the log stays finite.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return None
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def check_summary(obj: object, where: str = "drift baseline") -> dict[str, list[int]]:
    """Validate a summary read from untrusted JSON (e.g. a manifest's ``drift_baseline``)."""
    from .errors import ProtocolError

    if not isinstance(obj, dict) or set(obj) != set(FIELDS):
        raise ProtocolError(f"{where} must be an object with exactly the keys {', '.join(FIELDS)}")
    for f in FIELDS:
        v = obj[f]
        if not (isinstance(v, list) and len(v) == N_BINS
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**62 for c in v)):
            raise ProtocolError(f"{where}: {f} must be a list of {N_BINS} non-negative integers")
    return {f: list(obj[f]) for f in FIELDS}
