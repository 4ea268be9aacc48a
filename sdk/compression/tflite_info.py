"""What a ``.tflite`` model asks of the runtime that loads it, and how it computes.

The op table comes from :mod:`sdk.protocol.opset` (the one reader of it, shared with the agent
side and ``edgectl devices fit``); whether an older runtime loads the model is decided there too,
from the per-op limits measured into ``devices/runtimes.toml``. A runtime older than the model's
ops refuses it (``Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'``), so
compressing for such a device must not pick it. The converter's own ``min_runtime_version``
metadata is reported alongside, as the converter's claim.
"""

from __future__ import annotations

from typing import Any

from ..protocol import BundleError, CompressionError
from ..protocol.opset import op_codes, runtime_limits, unsupported_ops

_INTEGER_TYPES = {"INT8", "UINT8", "INT16", "INT32", "INT64"}


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency of edgectl[sdk]
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def is_tflite(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == b"TFL3"


def _ints(a: Any) -> list[int]:
    return [] if a is None else [int(i) for i in a]


def _is_constant(model: Any, tensor: Any) -> bool:
    buffers = model.buffers or []
    if tensor.buffer <= 0 or tensor.buffer >= len(buffers):
        return False
    data = buffers[tensor.buffer].data
    return (data is not None and len(data) > 0) or getattr(buffers[tensor.buffer], "size", 0) > 0


def inspect_tflite(data: bytes) -> dict[str, Any]:
    """Op codes + versions, min runtime version, and which ops compute in float."""
    if not is_tflite(data):
        raise CompressionError("not a TFLite model: the file lacks the 'TFL3' flatbuffer identifier")
    schema = _schema()
    try:
        model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    except Exception as exc:  # flatbuffers raises assorted errors on a truncated buffer
        raise CompressionError(f"not a readable TFLite model: {type(exc).__name__}: {exc}") from None
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    try:
        table = op_codes(data)
    except BundleError as exc:
        raise CompressionError(str(exc)) from None
    codes = [{"op": name.removeprefix("CUSTOM:"), "version": version, "custom": name.startswith("CUSTOM:")}
             for name, version in table]
    metadata: dict[str, str] = {}
    for md in model.metadata or []:
        buf = model.buffers[md.buffer].data if md.buffer < len(model.buffers or []) else None
        if md.name and md.name.decode() == "min_runtime_version" and buf is not None:
            metadata["min_runtime_version"] = bytes(buf).split(b"\0", 1)[0].decode()
    # Which operators compute in float: any float32 input/output tensor, QUANTIZE/DEQUANTIZE aside.
    float_ops: dict[str, int] = {}
    activation_types: set[str] = set()
    for sg in model.subgraphs or []:
        for op in sg.operators or []:
            name = codes[op.opcodeIndex]["op"]
            idx = [*_ints(op.inputs), *_ints(op.outputs)]
            tensors = [sg.tensors[i] for i in idx if i >= 0]
            kinds = {type_names.get(t.type, "?") for t in tensors if not _is_constant(model, t)}
            activation_types |= kinds
            if name not in ("QUANTIZE", "DEQUANTIZE", "SHAPE", "STRIDED_SLICE", "PACK", "RESHAPE") and "FLOAT32" in kinds:
                float_ops[name] = float_ops.get(name, 0) + 1
    ops = sorted({(c["op"], c["version"]) for c in codes})
    return {
        "ops": [{"op": o, "version": v} for o, v in ops],
        "custom_ops": sorted({c["op"] for c in codes if c["custom"]}),
        "min_runtime_version": metadata.get("min_runtime_version"),
        "float_ops": float_ops,
        "activation_types": sorted(activation_types),
    }


def runtime_support(info: dict[str, Any], runtime: str, *, host_loaded: bool) -> tuple[bool, str]:
    """Can ``runtime`` (a profile's runtime name) load a model with this ``info``? (ok, why)."""
    if info["custom_ops"]:
        return False, f"custom ops {', '.join(info['custom_ops'])} need a runtime built with them"
    entry = runtime_limits().get(runtime)
    if entry:
        need = info.get("min_runtime_version")
        claim = f"; the converter says it needs TFLite runtime >= {need}" if need else ""
        reasons = unsupported_ops({o["op"]: o["version"] for o in info["ops"]}, runtime)
        if reasons:
            return False, f"{runtime} {entry['version']} fails to load it: {'; '.join(reasons)}{claim}"
        return True, f"every op is within what {runtime} {entry['version']} registers (devices/runtimes.toml){claim}"
    if not host_loaded:
        return False, f"the host's LiteRT could not load it, so {runtime} cannot be assumed to"
    return True, f"loaded and run by the host's {runtime} build (same converter generation)"
