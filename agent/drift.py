"""Per-interval summary of what the model sees and answers, for drift and feedback (pure numpy).

The inference worker calls :meth:`DriftRecorder.record` with each request's input and output;
the ticker calls :meth:`DriftRecorder.snapshot` when it builds the interval's telemetry. The
summary is three fixed-bin histograms (``sdk.protocol.drift``) and up to
``Telemetry.MAX_PREDICTIONS`` sampled ``[request_id, predicted_class]`` pairs, so the server can
join ground-truth labels sent later with ``edgectl feedback``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from sdk.protocol import drift
from sdk.protocol.messages import Telemetry


class DriftRecorder:
    def __init__(self, max_predictions: int = Telemetry.MAX_PREDICTIONS):
        self._lock = threading.Lock()
        self._max = max_predictions
        self._reset()

    #: Requests kept as raw (x, y) before they are binned in one vectorised pass.
    PENDING = 256

    def _reset(self) -> None:
        self._counts = {f: np.zeros(drift.N_BINS, dtype=np.int64) for f in drift.FIELDS}
        self._n = 0
        self._predictions: list[list[Any]] = []
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def _flush(self) -> None:
        """Bin the pending requests (lock held). Batching keeps the per-request cost to an append."""
        groups: dict[tuple[Any, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for x, y in self._pending:  # same shapes -> one batched summary
            xs, ys = groups.setdefault((x.shape[1:], y.shape[1:], x.ndim, y.ndim), ([], []))
            xs.append(x)
            ys.append(y)
        self._pending = []
        for xs, ys in groups.values():
            try:
                batch_x = np.concatenate(xs) if xs[0].ndim else np.stack(xs)
                batch_y = np.concatenate(ys) if ys[0].ndim else np.stack(ys)
                summary = drift.summarize(batch_x, batch_y)
            except (ValueError, TypeError, IndexError):
                continue
            for f in drift.FIELDS:
                self._counts[f] += summary[f]

    def record(self, x: np.ndarray, y: np.ndarray, request_id: str | None = None) -> None:
        """Add one answered request; never raises (a summary must not fail an inference)."""
        predicted = None
        try:
            if request_id and y.ndim >= 1 and y.shape[-1] > 1 and y.size == y.shape[-1]:
                predicted = int(np.argmax(y.reshape(-1)))
        except (ValueError, TypeError, IndexError):
            return
        with self._lock:
            self._pending.append((x, y))
            self._n += 1
            if predicted is not None and len(self._predictions) < self._max:
                self._predictions.append([request_id[:64], predicted])
            if len(self._pending) >= self.PENDING:
                self._flush()

    def snapshot(self) -> dict[str, Any]:
        """Telemetry fields for the interval (``drift``, ``predictions``) and start anew."""
        with self._lock:
            self._flush()
            if self._n == 0:
                out: dict[str, Any] = {"drift": None, "predictions": None}
            else:
                out = {"drift": {f: [int(c) for c in self._counts[f]] for f in drift.FIELDS},
                       "predictions": list(self._predictions) or None}
            self._reset()
        return out
