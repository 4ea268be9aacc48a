"""Choosing the environment: which boards can run a model variant, and how fast (predicted).

For every device profile and every variant (a bundle, or a ``.tflite``/Keras model converted to
float32): the file must fit the profile's ``max_model_mb``; model + activation arena + the agent's
own footprint must fit in half the board's RAM (the rest is the OS's and the application's); the
profile's runtime must be able to load the variant's op versions (``devices/runtimes.toml``) and
its quantization must be one the profile accepts. Latency is **predicted**: the median host
latency of the real interpreter (1 thread) × the profile's ``speed_factor``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import CompressionError
from .protocol.bundle import read_bundle
from .protocol.opset import model_ops, unsupported_ops
from .protocol.profiles import Profile, load_profiles
from .protocol.runtime import TFLiteModel

#: RSS of an idle agent with a small model loaded, measured in the lean venvs (see README).
AGENT_BASE_MB = 56.0
RAM_SHARE = 0.5


@dataclass(frozen=True)
class Variant:
    label: str
    quantization: str
    tflite: bytes
    host_ms: float
    arena_bytes: int


@dataclass(frozen=True)
class Fit:
    profile: str
    variant: str
    fits: bool
    predicted_ms: float
    memory_mb: float
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"reasons": list(self.reasons), "predicted": True}


def _arena_bytes(model: TFLiteModel) -> int:
    """Upper bound of the activation arena: every non-constant tensor of the graph."""
    total = 0
    for t in model._interp.get_tensor_details():
        shape = [max(1, int(d)) for d in t.get("shape", [])]
        try:
            itemsize = np.dtype(t["dtype"]).itemsize
        except TypeError:
            itemsize = 4
        n = int(np.prod(shape)) * itemsize if shape else itemsize
        try:
            model._interp.tensor(t["index"])
        except ValueError:
            continue
        total += n
    return total


def _host_ms(model: TFLiteModel, runs: int = 100) -> float:
    from .compress import latency_ms

    spec = model.input_spec
    x = np.zeros([1 if d == -1 else d for d in spec["shape"]], dtype=np.dtype(spec["dtype"]))
    return latency_ms(model, x, runs)["median"]


def load_variant(path: str | Path) -> Variant:
    p = Path(path)
    if p.suffix in (".keras", ".h5") or p.is_dir():
        from .compress import convert, load_source

        tflite, quant = convert(load_source(p), "none"), "none"
    elif p.suffix == ".tflite":
        tflite, quant = p.read_bytes(), "unknown"
    else:
        b = read_bundle(p)
        if b.manifest.get("kind") == "pipeline":
            raise CompressionError(f"{p} is a pipeline bundle: fit its stages with `edgectl partition --devices`")
        tflite, quant = b.model_bytes, b.manifest["quantization"]
    model = TFLiteModel(tflite, num_threads=1)
    return Variant(p.name, quant, tflite, _host_ms(model), _arena_bytes(model))


def fit(variant: Variant, profile: Profile) -> Fit:
    reasons = []
    size_mb = len(variant.tflite) / 2**20
    memory_mb = size_mb + variant.arena_bytes / 2**20 + AGENT_BASE_MB
    if size_mb > profile.max_model_mb:
        reasons.append(f"model is {size_mb:.1f} MB, the profile allows {profile.max_model_mb} MB")
    if memory_mb > profile.ram_mb * RAM_SHARE:
        reasons.append(f"needs ~{memory_mb:.0f} MB, more than half of the board's {profile.ram_mb} MB")
    if variant.quantization not in ("unknown", *profile.quantizations):
        reasons.append(f"{variant.quantization} is not among the profile's quantizations ({', '.join(profile.quantizations)})")
    reasons += [f"runtime {profile.runtime} cannot load it: {r}" for r in unsupported_ops(model_ops(variant.tflite), profile.runtime)]
    return Fit(profile.name, variant.label, not reasons, profile.predict_ms(variant.host_ms), memory_mb, tuple(reasons))


def fit_all(paths: list[str | Path], latency_ms: float | None = None) -> dict[str, Any]:
    variants = [load_variant(p) for p in paths]
    profiles = load_profiles()
    rows = [fit(v, prof) for v in variants for prof in profiles.values()]
    recommendation = None
    if latency_ms is not None:
        ok = [r for r in rows if r.fits and r.predicted_ms <= latency_ms]
        # The least capable board that still meets the target (slowest predicted), then the
        # smallest model: that is usually the cheapest way to meet the target.
        ok.sort(key=lambda r: (-r.predicted_ms, r.memory_mb))
        recommendation = ok[0].to_dict() if ok else None
    return {"variants": [{"label": v.label, "quantization": v.quantization, "size_bytes": len(v.tflite),
                          "host_median_ms": v.host_ms, "arena_bytes": v.arena_bytes} for v in variants],
            "fits": [r.to_dict() for r in rows], "latency_target_ms": latency_ms,
            "recommendation": recommendation}
