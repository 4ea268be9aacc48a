"""Which builtin ops (and op versions) a ``.tflite`` model needs, and whether a runtime has them.

A converter newer than the device's runtime may emit an op version the runtime never registered
(TF 2.21's dynamic-range ``FULLY_CONNECTED`` is version 12; tflite-runtime 2.14 stops at 11 and
refuses the model). :func:`model_ops` reads the op table straight out of the model's FlatBuffer
(stdlib only, no schema package); :func:`unsupported_ops` compares it with the limits recorded
for a runtime in ``devices/runtimes.toml``.
"""

from __future__ import annotations

import struct
import tomllib
from functools import cache
from importlib import resources
from typing import Any

from .errors import BundleError


class _Table:
    """Minimal FlatBuffers table reader (little-endian, offsets as in the FlatBuffers spec)."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vsize = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, index: int) -> int:
        slot = 4 + 2 * index
        if slot >= self.vsize:
            return 0
        off = struct.unpack_from("<H", self.buf, self.vtable + slot)[0]
        return self.pos + off if off else 0

    def scalar(self, index: int, fmt: str, default: int) -> int:
        at = self._field(index)
        return struct.unpack_from("<" + fmt, self.buf, at)[0] if at else default

    def string(self, index: int) -> str | None:
        at = self._field(index)
        if not at:
            return None
        start = at + struct.unpack_from("<I", self.buf, at)[0]
        n = struct.unpack_from("<I", self.buf, start)[0]
        return self.buf[start + 4 : start + 4 + n].decode("utf-8", "replace")

    def tables(self, index: int) -> list[_Table]:
        at = self._field(index)
        if not at:
            return []
        vec = at + struct.unpack_from("<I", self.buf, at)[0]
        n = struct.unpack_from("<I", self.buf, vec)[0]
        out = []
        for i in range(n):
            elem = vec + 4 + 4 * i
            out.append(_Table(self.buf, elem + struct.unpack_from("<I", self.buf, elem)[0]))
        return out


@cache
def _op_names() -> dict[int, str]:
    """Builtin op code -> name, from the schema LiteRT ships (numbers only without it)."""
    try:
        from ai_edge_litert import schema_py_generated as schema  # type: ignore[import-not-found]
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated as schema  # type: ignore[import-not-found]
        except ImportError:
            return {}
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper() and isinstance(v, int)}


def op_name(code: int) -> str:
    return _op_names().get(code, f"BUILTIN_{code}")


def op_codes(model: bytes) -> list[tuple[str, int]]:
    """The model's operator-code table in order: ``(op name, version)``; operators refer to it by
    index. Custom ops appear as ``CUSTOM:<name>``."""
    buf = bytes(model)
    try:
        if len(buf) < 8 or buf[4:8] != b"TFL3":
            raise BundleError("not a TFLite model (no TFL3 identifier)")
        root = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
        codes = []
        for oc in root.tables(1):  # Model.operator_codes
            deprecated = oc.scalar(0, "b", 0)
            custom = oc.string(1)
            version = oc.scalar(2, "i", 1)
            code = max(deprecated, oc.scalar(3, "i", 0))
            codes.append((f"CUSTOM:{custom}" if custom is not None and code == 32 else op_name(code), version))
        return codes
    except (struct.error, IndexError) as exc:
        raise BundleError(f"not a readable TFLite model: {exc}") from None


def model_ops(model: bytes) -> dict[str, int]:
    """``{op name: highest version used}``; custom ops appear as ``CUSTOM:<name>``."""
    ops: dict[str, int] = {}
    for name, version in op_codes(model):
        ops[name] = max(ops.get(name, 0), version)
    return ops


@cache
def runtime_limits() -> dict[str, dict[str, Any]]:
    """``devices/runtimes.toml``: per runtime key, its version and max builtin op versions."""
    text = (resources.files("devices") / "runtimes.toml").read_text()
    data = tomllib.loads(text)
    for key, entry in data.items():
        if not isinstance(entry.get("version"), str) or not isinstance(entry.get("max_op_versions", {}), dict):
            raise BundleError(f"devices/runtimes.toml: [{key}] needs a version string and a max_op_versions table")
    return data


def unsupported_ops(ops: dict[str, int], runtime: str) -> list[str]:
    """Reasons ``runtime`` cannot load a model with ``ops`` (empty: nothing known against it).

    Runtimes without recorded limits (the current ai-edge-litert, tensorflow) are assumed to load
    what the current converter emits; the host checks that for real by loading the model.
    """
    entry = runtime_limits().get(runtime)
    if not entry:
        return []
    limits: dict[str, int] = entry.get("max_op_versions", {})
    customs_ok = set(entry.get("custom_ops", []))
    reasons = []
    for name, version in sorted(ops.items()):
        if name.startswith("CUSTOM:"):
            if name[7:] not in customs_ok:
                reasons.append(f"custom op {name[7:]} is not in {runtime} {entry['version']}")
        elif name in limits and version > limits[name]:
            reasons.append(f"{name} version {version} (max in {runtime} {entry['version']}: {limits[name]})")
        elif name not in limits and entry.get("complete", False):
            reasons.append(f"{name} is not in {runtime} {entry['version']}")
    return reasons
