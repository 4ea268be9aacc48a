"""Loading and running a TFLite model the same way on the workstation and on the device.

The backend is the first importable of ``ai_edge_litert`` (LiteRT, the successor of
tflite-runtime), ``tflite_runtime`` and ``tensorflow.lite``; the import happens when a model is
loaded, never at module import. ``check_sample`` is the smoke test every bundle carries: the
device must reproduce the expected output of the sample input before a model goes live.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import numpy as np

from .bundle import tensor_spec
from .errors import BundleError, ModelInputError

BACKENDS = ("ai_edge_litert", "tflite_runtime", "tensorflow")


def _interpreter_class(preferred: str | None = None) -> tuple[str, Any]:
    order = (preferred, *BACKENDS) if preferred else BACKENDS
    errors = []
    for name in order:
        try:
            if name == "ai_edge_litert":
                return name, importlib.import_module("ai_edge_litert.interpreter").Interpreter
            if name == "tflite_runtime":
                return name, importlib.import_module("tflite_runtime.interpreter").Interpreter
            if name == "tensorflow":
                return name, importlib.import_module("tensorflow").lite.Interpreter
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise BundleError("no TFLite runtime is installed (tried " + "; ".join(errors) + "); "
                      "install ai-edge-litert or tflite-runtime")


def backend_name(preferred: str | None = None) -> str:
    return _interpreter_class(preferred)[0]


class TFLiteModel:
    """A loaded model with one input and one output; ``run`` validates and is thread-safe."""

    def __init__(self, model: bytes, *, num_threads: int | None = None, backend: str | None = None):
        self.backend, cls = _interpreter_class(backend)
        try:
            self._interp = cls(model_content=bytes(model), num_threads=num_threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"the TFLite runtime ({self.backend}) cannot load the model: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        if len(self._in) != 1 or len(self._out) != 1:
            raise BundleError(f"model has {len(self._in)} inputs and {len(self._out)} outputs; "
                              "this edgectl runs single-input, single-output models")
        self._lock = threading.Lock()

    @staticmethod
    def _spec(d: dict[str, Any]) -> dict[str, Any]:
        shape = d.get("shape_signature")
        if shape is None or len(shape) == 0:
            shape = d["shape"]
        return tensor_spec(d["name"], list(shape), np.dtype(d["dtype"]).name, tuple(d.get("quantization", (0.0, 0))))

    @property
    def input_spec(self) -> dict[str, Any]:
        return self._spec(self._in[0])

    @property
    def output_spec(self) -> dict[str, Any]:
        return self._spec(self._out[0])

    def check_input(self, x: Any) -> np.ndarray:
        spec = self.input_spec
        if not isinstance(x, np.ndarray):
            raise ModelInputError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.dtype(spec["dtype"]):
            raise ModelInputError(f"input dtype is {x.dtype.name}, model expects {spec['dtype']}")
        want = spec["shape"]
        if x.ndim != len(want) or any(w not in (-1, g) for w, g in zip(want, x.shape, strict=False)):
            shown = ["?" if w == -1 else str(w) for w in want]
            raise ModelInputError(f"input shape is {list(x.shape)}, model expects [{', '.join(shown)}]")
        if x.size == 0:
            raise ModelInputError("input is empty")
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x)
        idx, out = self._in[0]["index"], self._out[0]["index"]
        with self._lock:
            if tuple(self._interp.get_input_details()[0]["shape"]) != x.shape:
                self._interp.resize_tensor_input(idx, list(x.shape))
                self._interp.allocate_tensors()
            self._interp.set_tensor(idx, x)
            self._interp.invoke()
            return np.array(self._interp.get_tensor(out))


def check_sample(model: TFLiteModel, x: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> float:
    """Run the bundle's sample; return the max abs deviation or raise :class:`BundleError`."""
    try:
        got = model.run(x)
    except ModelInputError as exc:
        raise BundleError(f"smoke test: the sample does not fit the model: {exc}") from None
    if got.shape != expected.shape:
        raise BundleError(f"smoke test: output shape {list(got.shape)} differs from expected {list(expected.shape)}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0
    if not np.allclose(got.astype(np.float64), expected.astype(np.float64), atol=atol, rtol=rtol):
        raise BundleError(f"smoke test: output deviates from the expected output by up to {diff:.3g} "
                          f"(allowed atol={atol}, rtol={rtol}); the runtime computes this model differently")
    return diff
