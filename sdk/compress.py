"""Keras / SavedModel → TFLite bundle, measured before and after.

TensorFlow is imported here, lazily, and only this module (and the demo's training step) needs
it; ``import sdk`` stays light. Every run converts a float32 reference next to the requested
variant, so "before" and "after" are both measured with the same interpreter and thread count,
whatever the source format.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import CompressionError
from .protocol.bundle import write_bundle
from .protocol.frames import tensor_to_npy
from .protocol.runtime import TFLiteModel

QUANT_MODES = ("none", "dynamic", "float16", "int8")
LATENCY_RUNS = 200


@contextlib.contextmanager
def quiet_native_output() -> Iterator[Path]:
    """Silence TensorFlow's chatter: C++ on fds 1/2 and Python prints (kept in a file for errors)."""
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    fd, name = tempfile.mkstemp(prefix="edgectl-tf-", suffix=".log")
    os.close(fd)
    log = Path(name)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield log
            finally:
                sink.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        log.unlink(missing_ok=True)


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        raise CompressionError("tensorflow is not installed: install 'edgectl[sdk]'") from None
    return tf


def load_arrays(path: str | Path, *, need_y: bool, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``x`` (and ``y``) from an ``.npz`` file, or ``x`` from a directory of ``.npy`` files."""
    p = Path(path)
    try:
        if p.is_dir():
            files = sorted(p.glob("*.npy"))
            if not files:
                raise CompressionError(f"{what} directory {p} holds no .npy files")
            x = np.stack([np.load(f, allow_pickle=False) for f in files])
            y = None
        else:
            with np.load(p, allow_pickle=False) as data:
                if "x" not in data:
                    raise CompressionError(f"{what} file {p} has no array 'x' (found: {', '.join(data.files) or 'none'})")
                x = data["x"]
                y = data.get("y", None)
    except (OSError, ValueError) as exc:
        raise CompressionError(f"cannot read {what} file {p}: {exc}") from None
    if need_y and y is None:
        raise CompressionError(f"{what} file {p} has no array 'y' (labels)")
    if y is not None and len(y) != len(x):
        raise CompressionError(f"{what} file {p}: x has {len(x)} rows but y has {len(y)}")
    return x, y


@dataclass
class Source:
    path: Path
    format: str
    size_bytes: int
    keras_model: Any = None


def load_source(path: str | Path) -> Source:
    p = Path(path)
    if not p.exists():
        raise CompressionError(f"{p} does not exist")
    tf = _tf()
    if p.is_dir():
        if not (p / "saved_model.pb").exists():
            raise CompressionError(f"{p} is a directory but not a SavedModel (no saved_model.pb)")
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return Source(p, "saved_model", size)
    if p.suffix not in (".keras", ".h5"):
        raise CompressionError(f"{p} is not a model: expected a .keras or .h5 file or a SavedModel directory")
    with open(p, "rb") as f:
        magic = f.read(8)
    if p.suffix == ".keras" and not magic.startswith(b"PK"):
        raise CompressionError(f"{p} is not a Keras model: a .keras file is a zip archive and this one is not")
    if p.suffix == ".h5" and not magic.startswith(b"\x89HDF"):
        raise CompressionError(f"{p} is not a Keras model: a .h5 file is HDF5 and this one is not")
    try:
        with quiet_native_output():
            model = tf.keras.models.load_model(p, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressionError(f"{p} is not a loadable Keras model: {first[:300]}") from None
    return Source(p, "keras", p.stat().st_size, model)


def _input_shape(src: Source) -> list[int]:
    if src.keras_model is not None:
        shape = src.keras_model.inputs[0].shape
        return [int(d) if d is not None else -1 for d in shape]
    return []  # learnt from the float reference model instead


def convert(src: Source, quantize: str, calibration: np.ndarray | None = None) -> bytes:
    """Convert the source model to TFLite bytes with one quantization mode."""
    if quantize not in QUANT_MODES:
        raise CompressionError(f"unknown quantization {quantize!r}: choose one of {', '.join(QUANT_MODES)}")
    if quantize == "int8" and calibration is None:
        raise CompressionError("int8 quantization needs a calibration set: pass --calibration FILE.npz (array x)")
    tf = _tf()
    with quiet_native_output() as log:
        try:
            if src.keras_model is not None:
                conv = tf.lite.TFLiteConverter.from_keras_model(src.keras_model)
            else:
                conv = tf.lite.TFLiteConverter.from_saved_model(str(src.path))
            if quantize != "none":
                conv.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantize == "float16":
                conv.target_spec.supported_types = [tf.float16]
            if quantize == "int8":
                cal = np.asarray(calibration, dtype=np.float32)

                def representative() -> Iterator[list[np.ndarray]]:
                    for row in cal[:500]:
                        yield [row[None, ...]]

                conv.representative_dataset = representative
                conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                conv.inference_input_type = tf.int8
                conv.inference_output_type = tf.int8
            return bytes(conv.convert())
        except Exception as exc:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompressionError(f"TFLite conversion ({quantize}) failed: {first[:300]}"
                                   + (f" [{' | '.join(tail)[:300]}]" if tail else "")) from None


def _quantize_input(x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero = spec["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    scale, zero = spec["quantization"]
    if np.dtype(spec["dtype"]).kind == "f" or not scale:
        return y.astype(np.float32)
    return (y.astype(np.float32) - zero) * scale


def _fit_batch_shape(x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    want = spec["shape"]
    if x.ndim == len(want) - 1:
        x = x[None, ...]
    if x.ndim != len(want) or any(w not in (-1, g) for w, g in zip(want[1:], x.shape[1:], strict=False)):
        raise CompressionError(f"data of shape {list(x.shape)} does not fit the model input {want}")
    return x


def predict(model: TFLiteModel, x: np.ndarray) -> np.ndarray:
    """Run rows of float data through a model one row at a time; float outputs."""
    spec_in, spec_out = model.input_spec, model.output_spec
    x = _fit_batch_shape(np.asarray(x, dtype=np.float32), spec_in)
    rows = [_dequantize(model.run(_quantize_input(x[i : i + 1], spec_in)), spec_out)[0] for i in range(len(x))]
    return np.stack(rows)


def latency_ms(model: TFLiteModel, sample: np.ndarray, runs: int = LATENCY_RUNS) -> dict[str, float]:
    for _ in range(10):
        model.run(sample)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.run(sample)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median": statistics.median(times), "p95": times[min(len(times) - 1, int(0.95 * len(times)))],
            "runs": runs}


def classification_scores(probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    pred = np.argmax(probs, axis=-1)
    y = np.asarray(y).reshape(-1).astype(int)
    classes = sorted(set(y.tolist()))
    recall = {str(c): float(np.mean(pred[y == c] == c)) for c in classes}
    return {"accuracy": float(np.mean(pred == y)), "macro_recall": float(np.mean(list(recall.values()))),
            "recall": recall, "n": len(y)}


@dataclass
class Variant:
    quantization: str
    tflite: bytes
    model: TFLiteModel
    scores: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"quantization": self.quantization, "size_bytes": len(self.tflite), **self.scores}


@dataclass
class CompressResult:
    bundle_path: Path
    bundle_sha256: str
    bundle_size: int
    manifest: dict[str, Any]
    report: dict[str, Any]


def compress(
    model_path: str | Path,
    output: str | Path,
    *,
    quantize: str = "dynamic",
    calibration: str | Path | None = None,
    eval_data: str | Path | None = None,
    sample: str | Path | None = None,
    name: str | None = None,
    version: str | None = None,
    threads: int = 1,
) -> CompressResult:
    """Compress one model into a bundle; measure the float32 reference and the variant."""
    src = load_source(model_path)
    cal_x = load_arrays(calibration, need_y=False, what="calibration")[0] if calibration else None
    ev = load_arrays(eval_data, need_y=True, what="eval") if eval_data else None

    reference = convert(src, "none")
    with quiet_native_output():  # LiteRT announces its XNNPACK delegate on stderr
        ref_model = TFLiteModel(reference, num_threads=threads)
    in_spec = ref_model.input_spec
    if cal_x is not None:
        cal_x = _fit_batch_shape(cal_x.astype(np.float32), in_spec)
        if len(cal_x) < 10:
            raise CompressionError(f"calibration set has {len(cal_x)} rows; int8 needs at least 10 (100+ recommended)")
    variant_bytes = reference if quantize == "none" else convert(src, quantize, cal_x)
    with quiet_native_output():
        variant = Variant(quantize, variant_bytes, TFLiteModel(variant_bytes, num_threads=threads))
    ref = Variant("none", reference, ref_model)

    # The smoke-test sample: given, else a calibration/eval row, else seeded noise.
    if sample is not None:
        sx = _fit_batch_shape(load_arrays(sample, need_y=False, what="sample")[0] if str(sample).endswith(".npz")
                              else np.load(sample, allow_pickle=False), in_spec)[:1]
    elif cal_x is not None:
        sx = cal_x[:1]
    elif ev is not None:
        sx = _fit_batch_shape(ev[0].astype(np.float32), in_spec)[:1]
    else:
        shape = [1 if d == -1 else d for d in in_spec["shape"]]
        sx = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    sx = sx.astype(np.float32)

    v_in, v_out = variant.model.input_spec, variant.model.output_spec
    sample_in = _quantize_input(sx, v_in)
    sample_out = variant.model.run(sample_in)
    integer_out = np.dtype(v_out["dtype"]).kind in "iu"
    atol, rtol = (1.0, 0.0) if integer_out else (1e-3, 1e-3)

    for v in (ref, variant):
        v.scores["latency_ms"] = latency_ms(v.model, _quantize_input(sx, v.model.input_spec))
        if ev is not None:
            probs = predict(v.model, ev[0])
            v.scores.update(classification_scores(probs, ev[1]))
            if v is variant:
                ref_probs = predict(ref.model, ev[0])
                v.scores["max_deviation"] = float(np.max(np.abs(probs - ref_probs)))
                v.scores["mean_deviation"] = float(np.mean(np.abs(probs - ref_probs)))

    name = name or Path(model_path).name.split(".")[0]
    version = version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S")
    report = {
        "source": {"path": str(src.path), "format": src.format, "size_bytes": src.size_bytes},
        "reference": ref.describe(),
        "variant": variant.describe(),
        "threads": threads,
        "host_runtime": variant.model.backend,
    }
    manifest = {
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quantization": quantize,
        "model": {"file": "model.tflite", "inputs": [v_in], "outputs": [v_out]},
        "sample": {"input": "sample_input.npy", "output": "sample_output.npy", "atol": atol, "rtol": rtol},
        "report": report,
    }
    files = {"model.tflite": variant_bytes, "sample_input.npy": tensor_to_npy(sample_in),
             "sample_output.npy": tensor_to_npy(sample_out)}
    out = Path(output)
    if out.parent and not out.parent.exists():
        raise CompressionError(f"output directory {out.parent} does not exist")
    sha = write_bundle(out, manifest, files)
    report["bundle"] = {"path": str(out), "sha256": sha, "size_bytes": out.stat().st_size}
    return CompressResult(out, sha, out.stat().st_size, manifest, report)
