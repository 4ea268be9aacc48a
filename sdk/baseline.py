"""The drift baseline of a bundle, computed from calibration/evaluation data on the host.

``compress`` can store ``baseline(x, model_outputs)`` in the manifest as ``drift_baseline``; the
server then compares the fleet's per-interval summaries with it (PSI). Without it the server
builds the baseline from the first intervals the fleet reports after activation.
"""

from __future__ import annotations

import numpy as np

from .protocol import drift


def baseline(x: np.ndarray, y: np.ndarray, batch: int = 1) -> dict[str, list[int]]:
    """Summary of inputs ``x`` and the model's outputs ``y`` (same first axis), as agents see
    them when requests carry ``batch`` rows each."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must have the same non-zero number of rows, got {x.shape[0]} and {y.shape[0]}")
    parts = [drift.summarize(x[i:i + batch], y[i:i + batch]) for i in range(0, x.shape[0], batch)]
    return drift.merge({f: p[f].tolist() for f in drift.FIELDS} for p in parts)
