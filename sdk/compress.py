"""Keras / SavedModel → TFLite bundle, measured before and after.

TensorFlow is imported here, lazily, and only this module (and the demo's training step) needs
it; ``import sdk`` stays light. Every run converts a float32 reference next to the requested
variant, so "before" and "after" are both measured with the same interpreter and thread count,
whatever the source format.
"""

from __future__ import annotations

import contextlib
import gzip
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

QUANT_MODES = ("none", "dynamic", "float16", "int8", "int16x8")
#: Pruning levels ``--auto`` tries when training data is given.
AUTO_PRUNE_LEVELS = (0.5, 0.8)
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
    if x.dtype.kind not in "fiub":
        raise CompressionError(f"{what} file {p}: x has dtype {x.dtype}, expected numbers (float32)")
    if y is not None and (y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0))):
        raise CompressionError(f"{what} file {p}: y must hold integer class indexes, got dtype {y.dtype}")
    if y is not None and len(y) != len(x):
        raise CompressionError(f"{what} file {p}: x has {len(x)} rows but y has {len(y)}")
    return x, y


@dataclass
class Source:
    path: Path
    format: str
    size_bytes: int
    keras_model: Any = None
    tflite: bytes | None = None


def load_source(path: str | Path) -> Source:
    p = Path(path)
    if not p.exists():
        raise CompressionError(f"{p} does not exist")
    if p.suffix == ".tflite" and p.is_file():
        from .compression.tflite_info import is_tflite

        data = p.read_bytes()
        if not is_tflite(data):
            raise CompressionError(f"{p} is not a TFLite model (no 'TFL3' flatbuffer identifier)")
        return Source(p, "tflite", len(data), tflite=data)
    tf = _tf()
    if p.is_dir():
        if not (p / "saved_model.pb").exists():
            raise CompressionError(f"{p} is a directory but not a SavedModel (no saved_model.pb)")
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return Source(p, "saved_model", size)
    if p.suffix not in (".keras", ".h5"):
        raise CompressionError(f"{p} is not a model: expected a .keras, .h5 or .tflite file or a SavedModel directory")
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


def convert(src: Source, quantize: str, calibration: np.ndarray | None = None, *, float_io: bool = False) -> bytes:
    """Convert the source model to TFLite bytes with one quantization mode.

    int8 is full-integer with int8 input/output unless ``float_io`` (then the model quantizes its
    input and dequantizes its output itself); int16x8 keeps float input/output.
    """
    if quantize not in QUANT_MODES:
        raise CompressionError(f"unknown quantization {quantize!r}: choose one of {', '.join(QUANT_MODES)}")
    if src.tflite is not None:
        raise CompressionError(f"{src.path} is already a TFLite model: it is bundled as-is and cannot be re-quantized")
    if quantize in ("int8", "int16x8") and calibration is None:
        raise CompressionError(f"{quantize} quantization needs a calibration set: pass --calibration FILE.npz (array x)")
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
                if not float_io:
                    conv.inference_input_type = tf.int8
                    conv.inference_output_type = tf.int8
            if quantize == "int16x8":
                cal16 = np.asarray(calibration, dtype=np.float32)

                def representative16() -> Iterator[list[np.ndarray]]:
                    for row in cal16[:500]:
                        yield [row[None, ...]]

                conv.representative_dataset = representative16
                conv.target_spec.supported_ops = [
                    tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
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
    counts = np.bincount(pred, minlength=probs.shape[-1])
    top = int(np.argmax(counts))
    return {"accuracy": float(np.mean(pred == y)), "macro_recall": float(np.mean(list(recall.values()))),
            "recall": recall, "n": len(y), "top_class": top, "top_class_share": float(counts[top] / len(y)),
            "top_label_share": float(np.max(np.bincount(y)) / len(y))}




@dataclass
class Variant:
    label: str
    quantization: str
    tflite: bytes
    model: TFLiteModel | None
    prune: float | None = None
    float_io: bool = False
    scores: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] | None = None

    @property
    def gzip_bytes(self) -> int:
        return len(gzip.compress(self.tflite, compresslevel=9, mtime=0))

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "quantization": self.quantization, "prune": self.prune,
                "float_io": self.float_io, "size_bytes": len(self.tflite), "gzip_bytes": self.gzip_bytes,
                **self.scores, "runtime": self.runtime, "pruning": self.pruning}


@dataclass
class CompressResult:
    bundle_path: Path
    bundle_sha256: str
    bundle_size: int
    manifest: dict[str, Any]
    report: dict[str, Any]


def _label(quantize: str, prune: float | None, float_io: bool) -> str:
    q = "float32" if quantize == "none" else quantize + (" (float io)" if float_io else "")
    return f"pruned {prune:.0%} + {q}" if prune else q


def detect_quantization(info: dict[str, Any], in_spec: dict[str, Any]) -> str:
    """Best guess of how a ready ``.tflite`` was quantized (for the manifest of a BYO model)."""
    ops = {o["op"] for o in info["ops"]}
    acts = set(info["activation_types"])
    if "INT16" in acts:
        return "int16x8"
    if np.dtype(in_spec["dtype"]).kind in "iu" or ("INT8" in acts and "QUANTIZE" in ops):
        return "int8"
    if "DEQUANTIZE" in ops:
        return "float16"
    hybrid = any(o["version"] > 1 for o in info["ops"] if o["op"] in ("FULLY_CONNECTED", "CONV_2D"))
    return "dynamic" if hybrid else "none"


def _load(label: str, data: bytes, threads: int) -> tuple[TFLiteModel | None, str | None]:
    from .protocol import BundleError

    try:
        with quiet_native_output():  # LiteRT announces its XNNPACK delegate on stderr
            return TFLiteModel(data, num_threads=threads), None
    except BundleError as exc:
        return None, f"{label}: {exc}"


def _runtime_info(v: Variant) -> dict[str, Any]:
    from .compression.tflite_info import inspect_tflite, runtime_support
    from .protocol.profiles import RUNTIMES

    info = inspect_tflite(v.tflite)
    info["host_loaded"] = v.model is not None
    info["support"] = {}
    for rt in RUNTIMES:
        ok, why = runtime_support(info, rt, host_loaded=v.model is not None)
        info["support"][rt] = {"ok": ok, "why": why}
    return info


def _check_eval(ev: tuple[np.ndarray, np.ndarray], spec_out: dict[str, Any], where: str) -> None:
    n_out = spec_out["shape"][-1]
    y = np.asarray(ev[1]).reshape(-1)
    if len(y) and (y.min() < 0 or y.max() >= n_out):
        raise CompressionError(f"{where}: labels run {int(y.min())}..{int(y.max())} but the model has {n_out} "
                               f"outputs (labels must be class indexes 0..{n_out - 1})")


def _clone(model: Any) -> Any:
    import keras

    c = keras.models.clone_model(model)
    c.set_weights(model.get_weights())
    return c


def _variant_entries(built: list[Variant], chosen: Variant, sx: np.ndarray, files: dict[str, bytes],
                     atol: float, rtol: float) -> list[dict[str, Any]]:
    """Manifest ``variants``: every quantization built, each with its file and its own smoke-test
    sample (the chosen one is ``model.tflite``); ``files`` gains their files."""
    out = []
    for v in built:
        if v.model is None:
            raise CompressionError(f"the host runtime cannot load {v.label}, so it cannot be a variant")
        file = "model.tflite" if v is chosen else f"model-{v.quantization}.tflite"
        v_in, v_out = v.model.input_spec, v.model.output_spec
        x = _quantize_input(sx, v_in)
        integer_out = np.dtype(v_out["dtype"]).kind in "iu"
        sample = ({"input": "sample_input.npy", "output": "sample_output.npy"} if v is chosen else
                  {"input": f"sample_input-{v.quantization}.npy", "output": f"sample_output-{v.quantization}.npy"})
        if v is not chosen:
            files[file] = v.tflite
            files[sample["input"]], files[sample["output"]] = tensor_to_npy(x), tensor_to_npy(v.model.run(x))
        out.append({"name": v.label, "file": file, "quantization": v.quantization, "inputs": [v_in],
                    "outputs": [v_out], "size_bytes": len(v.tflite),
                    "sample": {**sample, "atol": 1.0 if integer_out else atol, "rtol": 0.0 if integer_out else rtol},
                    "latency_ms": v.scores.get("latency_ms"), "accuracy": v.scores.get("accuracy")})
    return out


def compress(
    model_path: str | Path,
    output: str | Path,
    *,
    quantize: str | None = "dynamic",
    calibration: str | Path | None = None,
    eval_data: str | Path | None = None,
    sample: str | Path | None = None,
    name: str | None = None,
    version: str | None = None,
    threads: int = 1,
    float_io: bool = False,
    prune: float | None = None,
    train: str | Path | None = None,
    prune_epochs: int = 4,
    auto: bool = False,
    max_accuracy_drop: float = 1.0,
    target: str | None = None,
    sign: str | Path | None = None,
    variant_modes: list[str] | None = None,
) -> CompressResult:
    """Compress one model into a bundle; measure the float32 reference and every variant tried.

    Without ``auto`` one variant is built (optionally pruned to ``prune`` first, fine-tuned on
    ``train``). With ``auto`` every quantization the target allows (× pruning levels when
    ``train`` is given) is built and measured, and the smallest (gzip) within
    ``max_accuracy_drop`` points of the float32 reference, loadable by the target's runtime, ships.
    ``sign`` (an Ed25519 private key file) signs the bundle.
    ``variant_modes`` (quantizations, e.g. ``["float16", "int8"]``) builds one bundle holding each
    of them, every one with its own smoke-test sample (manifest ``variants``); the first is the
    default model, and the server gives each device the variant its profile prefers.
    """
    from .compression import select
    from .compression.pruning import check_sparsity
    from .compression.pruning import prune as run_prune

    if prune is not None:
        check_sparsity(prune)
    if threads < 1:
        raise CompressionError(f"--threads must be >= 1, got {threads}")
    if quantize is not None and quantize not in QUANT_MODES:
        raise CompressionError(f"unknown quantization {quantize!r}: choose one of {', '.join(QUANT_MODES)}")
    if variant_modes is not None:
        bad = [m for m in variant_modes if m not in QUANT_MODES]
        if bad or not variant_modes or len(set(variant_modes)) != len(variant_modes):
            raise CompressionError(f"--variants {','.join(variant_modes)!r} must list distinct quantizations out of "
                                   f"{', '.join(QUANT_MODES)}")
        if auto:
            raise CompressionError("--variants names the quantizations itself: drop --auto")
    profile = None
    if target:
        from .protocol.profiles import get_profile

        profile = get_profile(target)
    out = Path(output)
    if out.parent and not out.parent.exists():
        raise CompressionError(f"output directory {out.parent} does not exist")
    bundle_signer = None
    if sign is not None:  # read the key before the (long) conversion: a bad key fails at once
        from .protocol.signing import signer

        bundle_signer = signer(sign)

    src = load_source(model_path)
    cal_x = load_arrays(calibration, need_y=False, what="calibration")[0] if calibration else None
    ev = load_arrays(eval_data, need_y=True, what="eval") if eval_data else None
    tr = load_arrays(train, need_y=True, what="train") if train else None
    if auto and ev is None:
        raise CompressionError("--auto needs --eval FILE.npz (x, y): the accuracy budget is measured on it")
    if src.tflite is not None and (prune is not None or tr is not None):
        raise CompressionError(f"{src.path} is a TFLite model: pruning needs the Keras model")
    if src.tflite is not None and quantize not in (None, "none", "dynamic") and not auto:
        raise CompressionError(f"{src.path} is already a TFLite model: it is bundled as-is and cannot be "
                               f"re-quantized to {quantize}")

    # The float32 reference: converted from the unpruned source (for a .tflite: the file itself).
    reference = src.tflite if src.tflite is not None else convert(src, "none")
    ref_model, err = _load("reference", reference, threads)
    if ref_model is None:
        raise CompressionError(f"{src.path}: {err}")
    in_spec, out_spec = ref_model.input_spec, ref_model.output_spec
    if cal_x is not None:
        cal_x = _fit_batch_shape(cal_x.astype(np.float32), in_spec)
        if len(cal_x) < 10:
            raise CompressionError(f"calibration set has {len(cal_x)} rows; int8 needs at least 10 (100+ recommended)")
    if ev is not None:
        ev = (_fit_batch_shape(ev[0].astype(np.float32), in_spec), ev[1])
        _check_eval(ev, out_spec, f"eval file {eval_data}")
    if tr is not None:
        tr = (_fit_batch_shape(tr[0].astype(np.float32), in_spec), tr[1])
        _check_eval(tr, out_spec, f"train file {train}")

    # What to build.
    plan: list[tuple[float | None, str]]
    skipped: list[str] = []
    if src.tflite is not None:
        from .compression.tflite_info import inspect_tflite

        plan = [(None, detect_quantization(inspect_tflite(src.tflite), in_spec))]
    elif auto:
        modes = list(profile.quantizations) if profile else list(QUANT_MODES)
        if cal_x is None:
            skipped += [f"{m}: no calibration set (--calibration)" for m in modes if m in ("int8", "int16x8")]
            modes = [m for m in modes if m not in ("int8", "int16x8")]
        levels: list[float | None] = [None]
        if tr is not None:
            levels += [prune] if prune is not None else list(AUTO_PRUNE_LEVELS)
        elif prune is not None:
            levels += [prune]
        plan = [(lv, m) for lv in levels for m in modes]
    elif variant_modes:
        plan = [(prune, m) for m in variant_modes]
    else:
        plan = [(prune, quantize or "dynamic")]

    ref = Variant("float32 (reference)", "none", reference, ref_model)
    variants: list[Variant] = []
    pruned_models: dict[float, tuple[Any, dict[str, Any]]] = {}
    for level, mode in plan:
        if src.tflite is not None:
            v = Variant(f"{mode} (as given)", mode, src.tflite, ref_model)
            variants.append(v)
            continue
        s = src
        stats = None
        if level is not None:
            if level not in pruned_models:
                with quiet_native_output():
                    pr = run_prune(_clone(src.keras_model), level, x=tr[0] if tr else None, y=tr[1] if tr else None,
                                   epochs=prune_epochs)
                pruned_models[level] = (pr.model, pr.stats)
            s = Source(src.path, src.format, src.size_bytes, pruned_models[level][0])
            stats = pruned_models[level][1]
        fio = float_io and mode == "int8"
        label = _label(mode, level, fio)
        try:
            data = reference if (mode == "none" and level is None) else convert(s, mode, cal_x, float_io=fio)
        except CompressionError as exc:
            if not auto:
                raise
            skipped.append(f"{label}: {exc}")
            continue
        model, err = _load(label, data, threads)
        if model is None and not auto:
            raise CompressionError(err or label)
        variants.append(Variant(label, mode, data, model, prune=level, float_io=fio, pruning=stats))

    # The smoke-test sample: given, else a calibration/eval row, else seeded noise.
    if sample is not None:
        sx = _fit_batch_shape(load_arrays(sample, need_y=False, what="sample")[0] if str(sample).endswith(".npz")
                              else np.load(sample, allow_pickle=False), in_spec)[:1]
    elif cal_x is not None:
        sx = cal_x[:1]
    elif ev is not None:
        sx = ev[0][:1]
    else:
        shape = [1 if d == -1 else d for d in in_spec["shape"]]
        sx = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    sx = sx.astype(np.float32)

    ref_probs = predict(ref_model, ev[0]) if ev is not None else None
    cal_shift = None
    if cal_x is not None and ev is not None:
        span = float(np.ptp(ev[0])) or 1.0
        cal_shift = max(abs(float(cal_x.min()) - float(ev[0].min())), abs(float(cal_x.max()) - float(ev[0].max()))) / span
    for v in (ref, *variants):
        v.runtime = _runtime_info(v)
        if v.model is None:
            continue
        v.scores["latency_ms"] = latency_ms(v.model, _quantize_input(sx, v.model.input_spec))
        if ev is not None:
            probs = ref_probs if v is ref else predict(v.model, ev[0])
            v.scores.update(classification_scores(probs, ev[1]))
            if v is not ref:
                v.scores["max_deviation"] = float(np.max(np.abs(probs - ref_probs)))
                v.scores["mean_deviation"] = float(np.mean(np.abs(probs - ref_probs)))
    reference_d = ref.describe()
    described = [v.describe() for v in variants]
    warnings: list[str] = list(skipped)
    for d in described:
        d["collapse"] = select.diagnose_collapse(d, reference_d, calibration_rows=None if cal_x is None else len(cal_x),
                                                 calibration_shift=cal_shift)
        d["accuracy_drop_points"] = select.drop_points(reference_d, d)
    if not variants:
        raise CompressionError("no variant could be built: " + "; ".join(skipped))

    if auto:
        best = select.choose(described, reference_d, max_drop=max_accuracy_drop, profile=profile)
        chosen = variants[described.index(best)]
        why = (f"smallest compressed size ({best['gzip_bytes']:,} B gzip) among {sum(d['eligible'] for d in described)} "
               f"of {len(described)} candidates within {max_accuracy_drop:g} accuracy points"
               + (f" that {profile.name} ({profile.runtime}) can load" if profile else ""))
    else:
        chosen, best = variants[0], described[0]
        if chosen.model is None:
            raise CompressionError(f"the host runtime cannot load {chosen.label}")
        reasons = select.constraints(best, profile)
        if reasons:
            raise CompressionError(f"{chosen.label} does not suit {profile.name if profile else 'the host'}: "
                                   + "; ".join(reasons))
        best["chosen"] = True
        why = "requested"
    warnings += [d["collapse"] for d in described if d.get("collapse")]
    assert chosen.model is not None

    v_in, v_out = chosen.model.input_spec, chosen.model.output_spec
    sample_in = _quantize_input(sx, v_in)
    sample_out = chosen.model.run(sample_in)
    integer_out = np.dtype(v_out["dtype"]).kind in "iu"
    atol, rtol = (1.0, 0.0) if integer_out else (1e-3, 1e-3)

    name = name or Path(model_path).name.split(".")[0]
    version = version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S")
    report = {
        "source": {"path": str(src.path), "format": src.format, "size_bytes": src.size_bytes},
        "reference": reference_d,
        "variant": best,
        "candidates": described,
        "selection": {"mode": "auto" if auto else "fixed", "max_accuracy_drop_points": max_accuracy_drop if auto else None,
                      "target": profile.to_dict() if profile else None, "chosen": chosen.label, "why": why,
                      "size_measure": "gzip bytes (bundles travel deflated)"},
        "warnings": warnings,
        "threads": threads,
        "host_runtime": chosen.model.backend,
    }
    rt = chosen.runtime
    manifest = {
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quantization": chosen.quantization,
        "model": {"file": "model.tflite", "inputs": [v_in], "outputs": [v_out]},
        "sample": {"input": "sample_input.npy", "output": "sample_output.npy", "atol": atol, "rtol": rtol},
        "requires": {"tflite_ops": rt["ops"], "custom_ops": rt["custom_ops"],
                     "min_runtime_version": rt["min_runtime_version"],
                     "runtimes": {k: v["ok"] for k, v in rt["support"].items()}},
        "target": profile.name if profile else None,
        "report": report,
    }
    files = {"model.tflite": chosen.tflite, "sample_input.npy": tensor_to_npy(sample_in),
             "sample_output.npy": tensor_to_npy(sample_out)}
    if variant_modes and src.tflite is None:
        manifest["variants"] = _variant_entries(variants, chosen, sx, files, atol, rtol)
    sha = write_bundle(out, manifest, files, signer=bundle_signer)
    report["bundle"] = {"path": str(out), "sha256": sha, "size_bytes": out.stat().st_size,
                        "signed": bundle_signer is not None}
    return CompressResult(out, sha, out.stat().st_size, manifest, report)
