"""Binary frames: a JSON header plus raw bytes, for artifact chunks and inference answers.

Layout: ``b"EDG1"`` | header length (uint32, big endian) | header (UTF-8 JSON object) | body.
Tensors travel as ``.npy`` bytes (self-describing dtype and shape), never pickles.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ProtocolError

MAGIC = b"EDG1"
MAX_HEADER = 16 * 1024
#: Largest tensor accepted on the wire (bytes of the .npy payload).
MAX_TENSOR_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct(">I")


def pack(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(head) > MAX_HEADER:
        raise ProtocolError(f"frame header is {len(head)} bytes, limit is {MAX_HEADER}")
    return MAGIC + _LEN.pack(len(head)) + head + body


def unpack(data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < 8 or data[:4] != MAGIC:
        raise ProtocolError("not an edgectl frame (bad magic)")
    (n,) = _LEN.unpack_from(data, 4)
    if n > MAX_HEADER or 8 + n > len(data):
        raise ProtocolError(f"frame header length {n} is invalid for a {len(data)}-byte frame")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    return header, bytes(data[8 + n :])


@dataclass(frozen=True)
class Chunk:
    artifact: str
    index: int
    count: int
    data: bytes

    def encode(self) -> bytes:
        return pack(
            {"artifact": self.artifact, "index": self.index, "count": self.count,
             "sha256": hashlib.sha256(self.data).hexdigest()},
            self.data,
        )

    @classmethod
    def decode(cls, payload: bytes) -> Chunk:
        header, body = unpack(payload)
        try:
            artifact, index, count, digest = (header["artifact"], header["index"], header["count"],
                                              header["sha256"])
        except KeyError as exc:
            raise ProtocolError(f"chunk header lacks {exc}") from None
        if not (isinstance(artifact, str) and isinstance(index, int) and isinstance(count, int)
                and isinstance(digest, str) and 0 <= index < count):
            raise ProtocolError("chunk header has wrong types or an index outside [0, count)")
        if hashlib.sha256(body).hexdigest() != digest:
            raise ProtocolError(f"chunk {index} of {artifact[:12]} does not match its sha256")
        return cls(artifact=artifact, index=index, count=count, data=body)


_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER_RE = re.compile(
    rb"^\{'descr': '([<>|][a-zA-Z]\d{1,2})', 'fortran_order': (True|False), 'shape': \(((?:\d+, ?)*\d*)\), \} *\n$")


def tensor_to_npy(array: np.ndarray) -> bytes:
    """``.npy`` v1.0 bytes, byte-identical to ``np.save`` (written directly: np.save is slow)."""
    a = np.asarray(array)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    if a.dtype.hasobject or a.dtype.names is not None or a.dtype.subdtype is not None:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)  # raises on objects: never pickles
        return buf.getvalue()
    shape = "(" + "".join(f"{d}, " for d in a.shape)[:-2] + ("," if a.ndim == 1 else "") + ")"
    head = f"{{'descr': '{np.lib.format.dtype_to_descr(a.dtype)}', 'fortran_order': False, 'shape': {shape}, }}"
    pad = 64 - (len(_NPY_MAGIC) + 2 + len(head) + 1) % 64
    header = (head + " " * (pad % 64) + "\n").encode("latin1")
    return _NPY_MAGIC + struct.pack("<H", len(header)) + header + a.tobytes()


def npy_to_tensor(data: bytes) -> np.ndarray:
    """Parse ``.npy`` bytes from an untrusted peer (no pickles, bounded size)."""
    if len(data) > MAX_TENSOR_BYTES:
        raise ProtocolError(f"tensor payload is {len(data)} bytes, limit is {MAX_TENSOR_BYTES}")
    if not data.startswith(b"\x93NUMPY"):
        raise ProtocolError("payload is not a .npy tensor (missing the .npy magic bytes)")
    fast = _fast_npy(data)
    if fast is not None:
        return fast
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError... on junk
        raise ProtocolError(f"payload is not a .npy tensor: {exc}") from None
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise ProtocolError("payload is not a numeric .npy tensor")
    return array


def _fast_npy(data: bytes) -> np.ndarray | None:
    """Parse the common v1.0 header without ``np.load``'s literal_eval (~10x faster); None = slow path."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        return None
    (n,) = struct.unpack_from("<H", data, 8)
    m = _HEADER_RE.match(data[10 : 10 + n])
    if m is None or m.group(2) != b"False":
        return None
    try:
        dtype = np.dtype(m.group(1).decode())
    except TypeError:
        return None
    if dtype.hasobject or dtype.kind not in "biufc":
        return None
    shape = tuple(int(d) for d in m.group(3).split(b",") if d.strip())
    body = memoryview(data)[10 + n :]
    count = int(np.prod(shape)) if shape else 1
    if len(body) != count * dtype.itemsize:
        raise ProtocolError(f"payload is not a .npy tensor: {len(body)} data bytes for shape {list(shape)} {dtype}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


@dataclass(frozen=True)
class InferResponse:
    """An agent's answer: ``ok`` with an output tensor, or an error message."""

    ok: bool
    output: np.ndarray | None = None
    error: str = ""
    model_version: str = ""
    latency_ms: float = 0.0
    #: Filled in by the client from the answer's user properties, never encoded: one entry per
    #: pipeline stage or replica that handled the request (``sdk.protocol.pipeline``).
    trace: tuple[dict[str, Any], ...] = ()

    def encode(self) -> bytes:
        body = tensor_to_npy(self.output) if self.ok and self.output is not None else b""
        return pack({"ok": self.ok, "error": self.error, "model_version": self.model_version,
                     "latency_ms": self.latency_ms}, body)

    @classmethod
    def decode(cls, payload: bytes) -> InferResponse:
        header, body = unpack(payload)
        ok = bool(header.get("ok"))
        return cls(
            ok=ok,
            output=npy_to_tensor(body) if ok else None,
            error=str(header.get("error", "")),
            model_version=str(header.get("model_version", "")),
            latency_ms=float(header.get("latency_ms", 0.0)),
        )
