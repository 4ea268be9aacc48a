"""Loading and running a TFLite model the same way on the workstation and on the device.

Runtime **backends** are small plugins (:data:`BACKEND_PLUGINS`), one per package that provides a
TFLite interpreter: ``ai-edge-litert`` (LiteRT, the successor of tflite-runtime),
``tflite-runtime`` and, as a last resort, ``tensorflow`` (``tf.lite``). A device profile names the
one it prefers; the others are tried in that order when it is missing. The import happens when a
model is loaded, never at module import.

**Delegates** come from the profile too: ``xnnpack`` (the CPU path: XNNPACK is built into every
backend and takes the thread count), ``gpu`` (the TFLite GPU delegate library) and ``edgetpu``
(``libedgetpu.so.1``). A delegate library that is missing or refuses the model is not an error:
the model runs on the CPU and :attr:`TFLiteModel.fallback` says why, in one line.

``check_sample`` is the smoke test every bundle carries: the device must reproduce the expected
output of the sample input before a model goes live.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import threading
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

import numpy as np

from .bundle import tensor_spec
from .errors import BundleError, ModelInputError

log = logging.getLogger("edgectl.runtime")


@dataclass(frozen=True)
class Backend:
    """One TFLite interpreter provider: how to import it and how it is called on the wire."""

    key: str  # the profile's ``runtime`` value, e.g. "ai-edge-litert"
    module: str  # the import name reported in Status.runtime, e.g. "ai_edge_litert"
    distributions: tuple[str, ...]  # pip distributions that provide it (for the version)

    def load(self) -> tuple[Any, Any]:
        """``(Interpreter class, load_delegate function)``; raises ImportError when missing."""
        if self.module == "tensorflow":
            tf = importlib.import_module("tensorflow")
            return tf.lite.Interpreter, tf.lite.experimental.load_delegate
        mod = importlib.import_module(f"{self.module}.interpreter")
        return mod.Interpreter, mod.load_delegate

    def version(self) -> str:
        for dist in self.distributions:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return "unknown"


BACKEND_PLUGINS: tuple[Backend, ...] = (
    Backend("ai-edge-litert", "ai_edge_litert", ("ai-edge-litert", "ai-edge-litert-nightly")),
    Backend("tflite-runtime", "tflite_runtime", ("tflite-runtime", "tflite_runtime")),
    Backend("tensorflow", "tensorflow", ("tensorflow-cpu", "tensorflow", "tensorflow-aarch64")),
)
#: Import names, in the default order of preference (kept for callers of ``backend=``).
BACKENDS = tuple(b.module for b in BACKEND_PLUGINS)

#: Shared libraries of the delegates a profile can ask for. ``$EDGECTL_GPU_DELEGATE`` /
#: ``$EDGECTL_EDGETPU_DELEGATE`` override the file name (e.g. a full path on a Jetson).
DELEGATE_LIBRARIES = {"gpu": "libtensorflowlite_gpu_delegate.so", "edgetpu": "libedgetpu.so.1"}
DELEGATES = ("xnnpack", "gpu", "edgetpu")


def _find(name: str) -> Backend:
    for b in BACKEND_PLUGINS:
        if name in (b.key, b.module):
            return b
    raise BundleError(f"unknown TFLite runtime {name!r}; known: {', '.join(b.key for b in BACKEND_PLUGINS)}")


_WARNED: set[str] = set()


@cache
def _loaded(module: str) -> tuple[Any, Any] | str:
    try:
        return _find(module).load()
    except ImportError as exc:
        return str(exc)
    except Exception as exc:  # e.g. tflite-runtime 2.14 under numpy 2: "_ARRAY_API not found"
        return f"{type(exc).__name__}: {exc}"


def select_backend(preferred: str | None = None) -> tuple[Backend, Any, Any]:
    """The preferred backend if importable, else the first importable one in default order."""
    order = [_find(preferred)] if preferred else []
    order += [b for b in BACKEND_PLUGINS if b not in order]
    errors = []
    for b in order:
        got = _loaded(b.module)
        if isinstance(got, tuple):
            if preferred and b.module != _find(preferred).module and preferred not in _WARNED:
                _WARNED.add(preferred)
                log.warning("runtime %s is not usable (%s); falling back to %s", preferred,
                            errors[0] if errors else "?", b.key)
            return b, got[0], got[1]
        errors.append(f"{b.module}: {got}")
    raise BundleError("no TFLite runtime is installed (tried " + "; ".join(errors) + "); "
                      "install ai-edge-litert or tflite-runtime")


def _interpreter_class(preferred: str | None = None) -> tuple[str, Any]:
    b, cls, _ = select_backend(preferred)
    return b.module, cls


def backend_name(preferred: str | None = None) -> str:
    return select_backend(preferred)[0].module


def backend_version(preferred: str | None = None) -> str:
    return select_backend(preferred)[0].version()


def _library_present(library: str) -> str | None:
    """None when ``library`` can be dlopen'ed, else the loader's reason (no noisy delegate object)."""
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        return str(exc)
    return None


def load_delegate(kind: str, loader: Any) -> tuple[Any | None, str | None]:
    """``(delegate, None)`` or ``(None, why not)``. ``xnnpack`` needs no library (``(None, None)``)."""
    if kind not in DELEGATES:
        raise BundleError(f"unknown delegate {kind!r}; known: {', '.join(DELEGATES)}")
    if kind == "xnnpack":
        return None, None
    library = os.environ.get(f"EDGECTL_{kind.upper()}_DELEGATE") or DELEGATE_LIBRARIES[kind]
    missing = _library_present(library)
    if missing is not None:
        return None, f"{kind} delegate {library} is not available ({missing})"
    try:
        return loader(library), None
    except (ValueError, OSError, RuntimeError) as exc:
        return None, f"{kind} delegate {library} failed to load ({str(exc).strip()[:200]})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


class TFLiteModel:
    """A loaded model with one input and one output; ``run`` validates and is thread-safe.

    ``backend`` is the import name of the runtime in use; ``delegate`` the delegate actually in
    use (``"xnnpack"`` = the CPU path); ``fallback`` is None or why the asked-for delegate is not.
    """

    def __init__(self, model: bytes, *, num_threads: int | None = None, backend: str | None = None,
                 delegate: str = "xnnpack"):
        plugin, cls, loader = select_backend(backend)
        self.backend, self.runtime_version = plugin.module, plugin.version()
        self.num_threads = num_threads
        self.delegate, self.fallback = "xnnpack", None
        delegates: list[Any] = []
        if delegate != "xnnpack":
            handle, why = load_delegate(delegate, loader)
            if handle is None:
                self.fallback = f"{why}; running on the CPU (XNNPACK, {num_threads or 'default'} thread(s))"
            else:
                delegates, self.delegate = [handle], delegate
        try:
            self._interp = self._make(cls, model, num_threads, delegates)
        except (ValueError, RuntimeError) as exc:
            if not delegates:
                raise self._refusal(exc) from None
            self.fallback = (f"{delegate} delegate refused the model ({_first_line(exc)}); running on "
                             f"the CPU (XNNPACK, {num_threads or 'default'} thread(s))")
            self.delegate = "xnnpack"
            try:
                self._interp = self._make(cls, model, num_threads, [])
            except (ValueError, RuntimeError) as exc2:
                raise self._refusal(exc2) from None
        if self.fallback:
            log.warning("%s", self.fallback)
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        if len(self._in) != 1 or len(self._out) != 1:
            raise BundleError(f"model has {len(self._in)} inputs and {len(self._out)} outputs; "
                              "this edgectl runs single-input, single-output models")
        # Computed once: asking the interpreter for its details on every call cost ~100 µs.
        self._in_spec, self._out_spec = self._spec(self._in[0]), self._spec(self._out[0])
        self._in_dtype = np.dtype(self._in_spec["dtype"])
        self._in_index, self._out_index = self._in[0]["index"], self._out[0]["index"]
        self._cur_shape = tuple(int(d) for d in self._in[0]["shape"])
        self._lock = threading.Lock()

    @staticmethod
    def _make(cls: Any, model: bytes, num_threads: int | None, delegates: list[Any]) -> Any:
        kwargs: dict[str, Any] = {"model_content": bytes(model), "num_threads": num_threads}
        if delegates:
            kwargs["experimental_delegates"] = delegates
        interp = cls(**kwargs)
        interp.allocate_tensors()
        return interp

    def _refusal(self, exc: BaseException) -> BundleError:
        line = _first_line(exc)
        hint = ""
        if "Didn't find op for builtin opcode" in line:
            hint = (" — the model needs a newer op version than this runtime has; compress a variant "
                    "for this device's runtime (see `edgectl devices fit`)")
        return BundleError(f"the TFLite runtime ({self.backend} {self.runtime_version}) cannot load "
                           f"the model: {line}{hint}")

    @staticmethod
    def _spec(d: dict[str, Any]) -> dict[str, Any]:
        shape = d.get("shape_signature")
        if shape is None or len(shape) == 0:
            shape = d["shape"]
        return tensor_spec(d["name"], list(shape), np.dtype(d["dtype"]).name, tuple(d.get("quantization", (0.0, 0))))

    @property
    def input_spec(self) -> dict[str, Any]:
        return dict(self._in_spec)

    @property
    def output_spec(self) -> dict[str, Any]:
        return dict(self._out_spec)

    def check_input(self, x: Any) -> np.ndarray:
        spec = self._in_spec
        if not isinstance(x, np.ndarray):
            raise ModelInputError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != self._in_dtype:
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
        idx, out = self._in_index, self._out_index
        with self._lock:
            if self._cur_shape != x.shape:
                self._interp.resize_tensor_input(idx, list(x.shape))
                self._interp.allocate_tensors()
                self._cur_shape = x.shape
            self._interp.set_tensor(idx, x)
            self._interp.invoke()
            return self._interp.get_tensor(out)  # a copy already (the interpreter's own buffer is reused)


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
