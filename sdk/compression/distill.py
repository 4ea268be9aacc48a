"""Knowledge distillation (Hinton et al. 2015) for Keras 3 classifiers.

The student learns from ``alpha`` × T² × KL(teacher_T ‖ student_T) + (1 − alpha) × CE(labels,
student), where ``_T`` is a softmax at temperature T. Teacher targets are computed once. The same
student architecture is also trained from scratch on the labels alone, with the same epochs and
seed, so the report shows what distillation added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol import CompressionError

EPS = 1e-7


def _logits(model: Any, x: np.ndarray, is_prob: bool) -> np.ndarray:
    out = np.asarray(model.predict(x, verbose=0, batch_size=256), dtype=np.float64)
    return np.log(np.clip(out, EPS, 1.0)) if is_prob else out


def _is_probability(model: Any, x: np.ndarray) -> bool:
    p = np.asarray(model(x[:16], training=False))
    return bool(np.all(p >= 0) and np.allclose(p.sum(axis=-1), 1.0, atol=1e-3))


def _softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = z / t
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def count_params(model: Any) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


@dataclass
class DistillResult:
    model: Any
    report: dict[str, Any]


def distill(teacher: Any, student: Any, x: np.ndarray, y: np.ndarray, *, x_eval: np.ndarray | None = None,
            y_eval: np.ndarray | None = None, temperature: float = 4.0, alpha: float = 0.7, epochs: int = 30,
            batch_size: int = 32, learning_rate: float = 2e-3, seed: int = 0) -> DistillResult:
    """Train a fresh copy of ``student`` on teacher soft targets + labels; compare with scratch."""
    import keras
    from keras import ops

    if not temperature > 0:
        raise CompressionError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise CompressionError(f"alpha must be in [0, 1], got {alpha}")
    x = np.asarray(x, np.float32)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    n_cls = int(teacher.outputs[0].shape[-1])
    if int(student.outputs[0].shape[-1]) != n_cls:
        raise CompressionError(f"teacher has {n_cls} outputs but student has {int(student.outputs[0].shape[-1])}")
    if tuple(teacher.inputs[0].shape[1:]) != tuple(student.inputs[0].shape[1:]):
        raise CompressionError(f"teacher input {list(teacher.inputs[0].shape[1:])} differs from student input "
                               f"{list(student.inputs[0].shape[1:])}")
    if y.min() < 0 or y.max() >= n_cls:
        raise CompressionError(f"labels must be class indexes in [0, {n_cls}); found {y.min()}..{y.max()}")
    if x_eval is None or y_eval is None:
        x_eval, y_eval = x, y
    x_eval = np.asarray(x_eval, np.float32)
    y_eval = np.asarray(y_eval).reshape(-1).astype(np.int64)

    student_is_prob = _is_probability(student, x)
    soft = _softmax(_logits(teacher, x, _is_probability(teacher, x)), temperature).astype(np.float32)
    onehot = np.eye(n_cls, dtype=np.float32)[y]
    t = float(temperature)

    def kd_loss(target: Any, out: Any) -> Any:
        hard, soft_t = target[:, :n_cls], target[:, n_cls:]
        z = ops.log(ops.clip(out, EPS, 1.0)) if student_is_prob else out
        log_p_t = ops.log_softmax(z / t, axis=-1)
        kl = ops.sum(soft_t * (ops.log(ops.clip(soft_t, EPS, 1.0)) - log_p_t), axis=-1)
        ce = -ops.sum(hard * ops.log_softmax(z, axis=-1), axis=-1)
        return alpha * t * t * kl + (1.0 - alpha) * ce

    def fresh() -> Any:
        keras.utils.set_random_seed(seed)
        m = keras.models.clone_model(student)
        return m

    def accuracy(m: Any) -> float:
        return float(np.mean(np.argmax(m.predict(x_eval, verbose=0, batch_size=256), -1) == y_eval))

    scratch = fresh()
    scratch.compile(optimizer=keras.optimizers.Adam(learning_rate),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not student_is_prob))
    keras.utils.set_random_seed(seed)
    scratch.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)

    distilled = fresh()
    distilled.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=kd_loss)
    keras.utils.set_random_seed(seed)
    distilled.fit(x, np.concatenate([onehot, soft], axis=1), epochs=epochs, batch_size=batch_size, verbose=0)

    t_acc, s_acc, d_acc = accuracy(teacher), accuracy(scratch), accuracy(distilled)
    t_params, s_params = count_params(teacher), count_params(distilled)
    report = {
        "teacher": {"params": t_params, "accuracy": t_acc},
        "student_scratch": {"params": s_params, "accuracy": s_acc},
        "student_distilled": {"params": s_params, "accuracy": d_acc},
        "param_ratio": s_params / t_params,
        "retained": d_acc / t_acc if t_acc else 0.0,
        "gain_over_scratch": d_acc - s_acc,
        "temperature": t, "alpha": alpha, "epochs": epochs, "train_rows": len(x), "eval_rows": len(x_eval),
    }
    return DistillResult(distilled, report)


def load_keras(path: str | Path, what: str) -> Any:
    from ..compress import load_source

    src = load_source(path)
    if src.keras_model is None:
        raise CompressionError(f"{what} {path} must be a .keras/.h5 model (got a {src.format})")
    return src.keras_model
