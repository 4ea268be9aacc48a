"""Which variant of a bundle each device runs: pure functions over the manifest and profiles.

A bundle may hold the same model in several quantizations (manifest ``variants``, written by
``edgectl compress --variants float16,int8``). A device gets the variant its profile prefers
(``preferred_quantization`` in ``devices/profiles/*.toml``); failing that, the smallest one its
profile can run; failing that (or without a profile), the bundle's default model. Each choice
carries a sentence saying why. :func:`smaller` finds where a device class goes when it misses
its latency SLO on the variant it runs (the opt-in downgrade of a rollout).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sdk.protocol.profiles import Profile


@dataclass(frozen=True)
class Choice:
    #: The model file the device runs ("" = the manifest's default ``model.file``).
    file: str
    quantization: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def entries(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every variant with its file, quantization and size; the default model is always one."""
    files = manifest.get("files", {})
    default = manifest["model"]["file"]
    out = [dict(v) for v in manifest.get("variants", [])]
    if default not in {v["file"] for v in out}:
        out.insert(0, {"file": default, "quantization": manifest["quantization"]})
    for v in out:
        v.setdefault("size_bytes", files.get(v["file"], {}).get("size", 0))
        v["default"] = v["file"] == default
    return out


def has_variants(manifest: Mapping[str, Any] | None) -> bool:
    return bool(manifest) and len(entries(manifest)) > 1  # type: ignore[arg-type]


def _file(manifest: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    return "" if entry["file"] == manifest["model"]["file"] else entry["file"]


def choose(manifest: Mapping[str, Any], device_profiles: Mapping[str, str],
           profiles: Mapping[str, Profile]) -> dict[str, Choice]:
    """Device id -> the variant it runs (see the module docstring)."""
    vs = entries(manifest)
    default = next(v for v in vs if v["default"])
    out: dict[str, Choice] = {}
    for dev, name in device_profiles.items():
        prof = profiles.get(name) if name else None
        if prof is None:
            why = (f"profile {name!r} is unknown" if name else "no profile") + \
                  f": the default model ({default['quantization']})"
            out[dev] = Choice(_file(manifest, default), default["quantization"], why)
            continue
        preferred = [v for v in vs if v["quantization"] == prof.preferred_quantization]
        allowed = sorted((v for v in vs if v["quantization"] in prof.quantizations), key=lambda v: v["size_bytes"])
        if preferred:
            v, why = preferred[0], f"{prof.name} prefers {prof.preferred_quantization}"
        elif allowed:
            v = allowed[0]
            why = (f"{prof.name} prefers {prof.preferred_quantization}, which the bundle lacks; the smallest "
                   f"it can run is {v['quantization']}")
        else:
            v = default
            why = (f"{prof.name} runs {', '.join(prof.quantizations)}: no variant fits, the default model "
                   f"({v['quantization']})")
        out[dev] = Choice(_file(manifest, v), v["quantization"], why)
    return out


def smaller(manifest: Mapping[str, Any], file: str, profile: Profile | None) -> dict[str, Any] | None:
    """The next smaller variant than ``file`` that ``profile`` can run (the largest of the
    smaller ones), or None."""
    vs = entries(manifest)
    cur = next((v for v in vs if _file(manifest, v) == file), None)
    if cur is None:
        return None
    ok = [v for v in vs if v["size_bytes"] < cur["size_bytes"]
          and (profile is None or v["quantization"] in profile.quantizations)]
    if not ok:
        return None
    best = max(ok, key=lambda v: v["size_bytes"])
    return {**best, "file": _file(manifest, best)}


def label(manifest: Mapping[str, Any], file: str) -> str:
    """``int8 (model-int8.tflite)`` for a role's file."""
    for v in entries(manifest):
        if _file(manifest, v) == file:
            return f"{v['quantization']} ({v['file']})"
    return file or manifest["model"]["file"]
