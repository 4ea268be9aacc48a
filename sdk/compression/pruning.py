"""Magnitude pruning for Keras 3 models, without tensorflow-model-optimization.

tensorflow-model-optimization only wraps Keras 2 models (see STACK-NOTES), so this is the same
algorithm written directly: every Dense/Conv kernel gets a 0/1 mask keeping its largest-magnitude
weights; during a short fine-tune the target sparsity rises on a polynomial schedule
(Zhu & Gupta 2017: s_t = s_f + (s_0 - s_f)(1 - t/T)^3), the masks are recomputed every few steps
and re-applied after every optimizer step, so pruned weights stay exactly zero. "Stripping" is
trivial: the result is a plain Keras model whose masked weights are zero. Sparse weights only
shrink a file once it is compressed (gzip/zip), which is how bundles travel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..protocol import CompressionError


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise CompressionError(f"sparsity {sparsity!r} is outside (0, 1): pass e.g. --prune 0.8 for 80 % zeros")
    return float(sparsity)


def polynomial_sparsity(step: int, *, final: float, begin: int, end: int, initial: float = 0.0, power: int = 3) -> float:
    """Target sparsity at ``step`` (constant ``initial`` before ``begin``, ``final`` after ``end``)."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    frac = (step - begin) / max(1, end - begin)
    return final + (initial - final) * (1.0 - frac) ** power


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """0/1 mask zeroing the ``sparsity`` fraction of smallest-magnitude entries."""
    k = round(float(sparsity) * int(weights.size))
    if k <= 0:
        return np.ones_like(weights, dtype=np.float32)
    flat = np.abs(weights).reshape(-1)
    order = np.argsort(flat, kind="stable")
    mask = np.ones(flat.size, dtype=np.float32)
    mask[order[:k]] = 0.0
    return mask.reshape(weights.shape)


def prunable_kernels(model: Any) -> list[Any]:
    """The kernels of every Dense/Conv layer (biases and normalisation stay dense)."""
    import keras

    kinds = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
             keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D, keras.layers.Conv2DTranspose)
    found = []
    for layer in _all_layers(model):
        if isinstance(layer, kinds):
            for w in layer.weights:
                if "kernel" in w.path.rsplit("/", 1)[-1] and int(np.prod(w.shape)) >= 8:
                    found.append(w)
    return found


def _all_layers(model: Any) -> list[Any]:
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        if hasattr(layer, "layers"):
            out.extend(_all_layers(layer))
    return out


@dataclass
class PruneResult:
    model: Any
    stats: dict[str, Any]


def sparsity_stats(kernels: list[Any]) -> dict[str, Any]:
    per, zeros, total = {}, 0, 0
    for w in kernels:
        v = np.asarray(w.numpy())
        z = int(np.sum(v == 0))
        per[w.path] = round(z / v.size, 4)
        zeros, total = zeros + z, total + v.size
    return {"achieved_sparsity": zeros / total if total else 0.0, "pruned_weights": total,
            "zero_weights": zeros, "per_layer": per}


def _output_is_probability(model: Any, x: np.ndarray) -> bool:
    p = np.asarray(model(x[:16], training=False))
    return bool(np.all(p >= 0) and np.allclose(p.sum(axis=-1), 1.0, atol=1e-3))


def prune(model: Any, sparsity: float, *, x: np.ndarray | None = None, y: np.ndarray | None = None,
          epochs: int = 4, batch_size: int = 32, learning_rate: float = 1e-3, update_every: int = 5,
          seed: int = 0) -> PruneResult:
    """Prune ``model`` (in place) to ``sparsity``; with ``x``/``y``, fine-tune on a schedule.

    Without training data the masks are applied once (one-shot pruning: accuracy usually falls
    sharply above ~50 %). With data, sparsity ramps up over the first 2/3 of the fine-tune and is
    held for the last third so the surviving weights can recover.
    """
    import keras

    sparsity = check_sparsity(sparsity)
    kernels = prunable_kernels(model)
    if not kernels:
        raise CompressionError("the model has no Dense or Conv kernels to prune")
    masks = {w.path: magnitude_mask(np.asarray(w.numpy()), sparsity) for w in kernels}

    def apply(target: float | None) -> None:
        for w in kernels:
            v = np.asarray(w.numpy())
            if target is not None:
                masks[w.path] = magnitude_mask(v, target)
            w.assign(v * masks[w.path])

    fine_tune = None
    if x is not None and y is not None:
        keras.utils.set_random_seed(seed)
        steps_per_epoch = int(np.ceil(len(x) / batch_size))
        total = max(1, steps_per_epoch * epochs)
        end = max(1, int(total * 2 / 3))

        for w in kernels:  # sparsity starts at 0 and ramps up
            masks[w.path] = np.ones(tuple(w.shape), dtype=np.float32)

        class Schedule(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.step = 0

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                self.step += 1
                s = self.step
                recompute = s % update_every == 0 or s == end
                apply(polynomial_sparsity(s, final=sparsity, begin=0, end=end) if recompute and s <= end else None)

        from_logits = not _output_is_probability(model, np.asarray(x, np.float32))
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
        history = model.fit(np.asarray(x, np.float32), np.asarray(y).astype(np.int64), epochs=epochs,
                            batch_size=batch_size, verbose=0, shuffle=True, callbacks=[Schedule()])
        apply(sparsity)  # the exact target, whatever the last scheduled step was
        fine_tune = {"epochs": epochs, "rows": len(x), "schedule": "polynomial (power 3), then constant",
                     "ramp_steps": end, "total_steps": total, "final_loss": float(history.history["loss"][-1])}
    else:
        apply(None)
    stats = sparsity_stats(kernels)
    stats.update({"target_sparsity": sparsity, "fine_tune": fine_tune, "method": "magnitude, per layer"})
    return PruneResult(model, stats)
