"""The bundle: one zip file holding ``manifest.json``, the model and its smoke-test sample.

The manifest lists every other file with its sha256 and size; a bundle is valid only when the
archive holds exactly those files with exactly those bytes. A bundle is named on the wire by the
sha256 of the whole zip (content addressing).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError
from .fsutil import write_atomic

FORMAT = "edgectl-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Optional detached signature over the exact bytes of manifest.json (see :mod:`.signing`).
SIGNATURE = "signature.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_FILE_BYTES = 2 * 1024**3
QUANTIZATIONS = ("none", "dynamic", "float16", "int8", "int16x8")
_REQUIRED = ("format", "format_version", "name", "version", "model", "quantization", "sample", "files")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_spec(name: str, shape: list[int], dtype: str, quantization: tuple[float, int] = (0.0, 0)) -> dict[str, Any]:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": str(dtype),
            "quantization": [float(quantization[0]), int(quantization[1])]}


def manifest_bytes(manifest: dict[str, Any], files: dict[str, bytes]) -> bytes:
    """The canonical manifest.json bytes for these files (what gets signed)."""
    manifest = dict(manifest)
    manifest.setdefault("format", FORMAT)
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest["files"] = {name: {"sha256": sha256_bytes(data), "size": len(data)}
                         for name, data in sorted(files.items())}
    validate_manifest(manifest, set(files))
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def write_bundle(path: str | Path, manifest: dict[str, Any], files: dict[str, bytes], *,
                 signer: Any = None) -> str:
    """Write a bundle atomically (temp file + rename); fills in ``files``; returns its sha256.

    ``signer(manifest_bytes) -> bytes`` (see :func:`sdk.protocol.signing.signer`) adds a signature.
    """
    head = manifest_bytes(manifest, files)
    return _write_entries(path, head, files, signer(head) if signer is not None else None)


def _write_entries(path: str | Path, head: bytes, files: dict[str, bytes], signature: bytes | None) -> str:
    entries = [(MANIFEST, head), *sorted(files.items())]
    if signature is not None:
        entries.append((SIGNATURE, signature))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        # Fixed timestamps keep the bundle's sha256 a function of its content alone.
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    data = buf.getvalue()
    write_atomic(path, data)
    return sha256_bytes(data)


def resign(path: str | Path, signer: Any) -> str:
    """Add (or replace) the signature of an existing bundle, after verifying it; returns its sha256."""
    b = read_bundle(path)
    return _write_entries(path, b.manifest_bytes, b.files, signer(b.manifest_bytes))


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise BundleError(f"manifest: {why}")


def _check_sample(sample: Any, files: dict[str, Any], where: str) -> None:
    _need(isinstance(sample, dict) and sample.get("input") in files and sample.get("output") in files,
          f"{where}.input and {where}.output must name listed files")
    _need(isinstance(sample.get("atol"), (int, float)) and isinstance(sample.get("rtol"), (int, float)),
          f"{where}.atol and {where}.rtol must be numbers")


def _check_io(specs: Any, where: str) -> None:
    _need(isinstance(specs, list) and len(specs) >= 1, f"{where} must be a non-empty list")
    for s in specs:
        _need(isinstance(s, dict) and isinstance(s.get("shape"), list)
              and all(isinstance(d, int) for d in s["shape"]) and isinstance(s.get("dtype"), str),
              f"{where} entries need shape (ints) and dtype")


def _check_variants(variants: list[Any], files: dict[str, Any]) -> None:
    """``variants``: the same model in other quantizations, one entry each: ``file``,
    ``quantization``, ``inputs``, ``outputs``, ``sample`` (the server picks one per device by its
    profile). Files are unique; the entry naming ``model.file`` (if any) describes the default."""
    seen: set[str] = set()
    for i, v in enumerate(variants):
        _need(isinstance(v, dict) and isinstance(v.get("file"), str), f"variants[{i}] must be an object with a file")
        where = f"variants[{i}] ({v['file']})"
        _need(v["file"] in files, f"{where}: file is not listed in files")
        _need(v["file"] not in seen, f"{where}: file appears twice")
        seen.add(v["file"])
        _need(v.get("quantization") in QUANTIZATIONS,
              f"{where}: quantization {v.get('quantization')!r} is not one of {QUANTIZATIONS}")
        for io_name in ("inputs", "outputs"):
            _check_io(v.get(io_name), f"{where}: {io_name}")


def validate_manifest(m: Any, present: set[str] | None = None) -> None:
    """Check the manifest's structure; with ``present``, that it lists exactly those files."""
    _need(isinstance(m, dict), "must be a JSON object")
    missing = [k for k in _REQUIRED if k not in m]
    _need(not missing, f"missing {', '.join(missing)}")
    _need(m["format"] == FORMAT, f"format is {m['format']!r}, expected {FORMAT!r}")
    _need(m["format_version"] == FORMAT_VERSION,
          f"format_version {m['format_version']!r} is not supported (this edgectl reads {FORMAT_VERSION})")
    _need(isinstance(m["name"], str) and isinstance(m["version"], str), "name and version must be strings")
    _need(m["quantization"] in QUANTIZATIONS, f"quantization {m['quantization']!r} is not one of {QUANTIZATIONS}")
    files = m["files"]
    _need(isinstance(files, dict) and files, "files must be a non-empty object")
    for name, entry in files.items():
        _need(isinstance(name, str) and name not in (MANIFEST, SIGNATURE) and "/" not in name and not name.startswith("."),
              f"file name {name!r} is not allowed")
        _need(isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
              and isinstance(entry.get("size"), int) and 0 <= entry["size"] <= MAX_FILE_BYTES,
              f"entry for {name!r} needs sha256 and size")
    model = m["model"]
    _need(isinstance(model, dict) and model.get("file") in files, "model.file must name a listed file")
    for io_name in ("inputs", "outputs"):
        specs = model.get(io_name)
        _need(isinstance(specs, list) and len(specs) >= 1, f"model.{io_name} must be a non-empty list")
        for s in specs:
            _need(isinstance(s, dict) and isinstance(s.get("shape"), list)
                  and all(isinstance(d, int) for d in s["shape"]) and isinstance(s.get("dtype"), str),
                  f"model.{io_name} entries need shape (ints) and dtype")
    _check_sample(m["sample"], files, "sample")
    extra = m.get("variants", [])
    _need(isinstance(extra, list), "variants must be a list")
    _check_variants(extra, files)
    pipeline = m.get("pipeline")
    if pipeline is not None:
        _need(isinstance(pipeline, dict) and isinstance(pipeline.get("stages"), list) and pipeline["stages"],
              "pipeline.stages must be a non-empty list")
        extra = [*extra, *pipeline["stages"]]
    for i, entry in enumerate(extra):
        _need(isinstance(entry, dict) and entry.get("file") in files, f"model entry {i} must name a listed file")
        _check_sample(entry.get("sample"), files, f"{entry['file']}: sample")
    if present is not None:
        listed = set(files)
        _need(listed == present,
              f"files differ from the archive: missing {sorted(listed - present)}, unlisted {sorted(present - listed)}")


@dataclass
class Bundle:
    """A bundle read into memory and checked against its manifest."""

    manifest: dict[str, Any]
    files: dict[str, bytes]
    sha256: str
    size: int
    #: The exact manifest bytes (what a signature covers) and the signature file, if any.
    manifest_bytes: bytes = b""
    signature: bytes | None = None

    @property
    def model_bytes(self) -> bytes:
        return self.files[self.manifest["model"]["file"]]

    def model_files(self) -> list[str]:
        """Every runnable model file: the default, its variants, the pipeline stages."""
        m = self.manifest
        entries = [*m.get("variants", []), *(m.get("pipeline") or {}).get("stages", [])]
        return list(dict.fromkeys([m["model"]["file"], *(e["file"] for e in entries)]))

    def model_entry(self, file: str = "") -> dict[str, Any]:
        """The description (file, inputs, outputs, sample, ...) of one model file of the bundle:
        "" is the default model, else a variant or a pipeline stage."""
        m = self.manifest
        if not file or file == m["model"]["file"]:
            return {**m["model"], "sample": m["sample"]}
        for e in (*m.get("variants", []), *(m.get("pipeline") or {}).get("stages", [])):
            if e["file"] == file:
                return e
        raise BundleError(f"bundle {m['name']} {m['version']} has no model file {file!r} "
                          f"(it holds {', '.join(self.model_files())})")

    def sample(self, file: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Smoke-test input and expected output of one model file (default: the main model)."""
        from .frames import npy_to_tensor

        s = self.model_entry(file)["sample"]
        return npy_to_tensor(self.files[s["input"]]), npy_to_tensor(self.files[s["output"]])


def read_bundle(source: str | Path | bytes) -> Bundle:
    """Read and fully verify a bundle; any inconsistency raises :class:`BundleError`."""
    try:
        return _read_bundle(source)
    except BundleError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError,
            ValueError, KeyError) as exc:  # the zip layer's many ways of saying "corrupt"
        where = source if isinstance(source, (str, Path)) else "bundle"
        raise BundleError(f"{where} is corrupt: {exc}") from None


def _read_bundle(source: str | Path | bytes) -> Bundle:
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read bundle {source}: {exc.strerror or exc}") from None
        where = str(source)
    else:
        data, where = bytes(source), "the uploaded data"
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise BundleError(f"{where} is not a bundle (not a zip archive)") from None
    with zf:
        names = zf.namelist()
        if MANIFEST not in names:
            raise BundleError(f"{where} has no {MANIFEST}")
        if len(names) != len(set(names)):
            raise BundleError(f"{where} holds duplicate file names")
        infos = {i.filename: i for i in zf.infolist()}
        if infos[MANIFEST].file_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{where}: {MANIFEST} is too large")
        try:
            manifest_bytes = zf.read(MANIFEST)
            manifest = json.loads(manifest_bytes)
        except (ValueError, zipfile.BadZipFile, OSError, zlib.error, EOFError) as exc:
            raise BundleError(f"{where}: {MANIFEST} is unreadable: {exc}") from None
        present = set(names) - {MANIFEST, SIGNATURE}
        signature = zf.read(SIGNATURE) if SIGNATURE in names and infos[SIGNATURE].file_size < 64 * 1024 else None
        if SIGNATURE in names and signature is None:
            raise BundleError(f"{where}: {SIGNATURE} is too large")
        validate_manifest(manifest, present)
        files: dict[str, bytes] = {}
        for name, entry in manifest["files"].items():
            if infos[name].file_size != entry["size"]:
                raise BundleError(f"{where}: {name} is {infos[name].file_size} bytes, manifest says {entry['size']}")
            try:
                content = zf.read(name)
            except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as exc:  # CRC/deflate errors
                raise BundleError(f"{where}: {name} is corrupt: {exc}") from None
            digest = sha256_bytes(content)
            if digest != entry["sha256"]:
                raise BundleError(f"{where}: {name} has sha256 {digest[:16]}…, manifest says {entry['sha256'][:16]}…")
            files[name] = content
    return Bundle(manifest=manifest, files=files, sha256=sha256_bytes(data), size=len(data),
                  manifest_bytes=manifest_bytes, signature=signature)
