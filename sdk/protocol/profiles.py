"""Device profiles: what a kind of board can run and how fast, read from TOML files.

Profiles ship in the ``devices`` package (``devices/profiles/NAME.toml``); ``$EDGECTL_PROFILES``
(a directory) adds or overrides profiles. Every file is validated field by field: a profile is
used by ``compress --target``, by the partitioner's cost model and by the agent's runtime choice,
so a typo must fail loudly, naming the file and the field.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .bundle import QUANTIZATIONS
from .errors import EdgeError


class ProfileError(EdgeError):
    """A device profile is missing or invalid."""


ACCELERATORS = ("none", "gpu", "edgetpu")
DELEGATES = ("xnnpack", "gpu", "edgetpu")
RUNTIMES = ("ai-edge-litert", "tflite-runtime", "tensorflow")


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    arch: str
    cores: int
    ram_mb: int
    accelerator: str
    delegate: str
    threads: int
    #: Device latency ≈ host-measured latency × speed_factor (an estimate; see each file).
    speed_factor: float
    #: Link bandwidth used to cost tensors crossing between devices (megabits per second).
    link_mbps: float
    runtime: str
    quantizations: tuple[str, ...]
    preferred_quantization: str
    max_model_mb: int
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quantizations"] = list(self.quantizations)
        return d

    def predict_ms(self, host_ms: float) -> float:
        """Predicted device latency from a host measurement (a prediction, not a measurement)."""
        return host_ms * self.speed_factor

    def transfer_ms(self, nbytes: int) -> float:
        return nbytes * 8 / (self.link_mbps * 1e6) * 1000


_SPEC: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "name": (str, None), "title": (str, None), "arch": (str, ("aarch64", "armv7l", "x86_64")),
    "cores": (int, None), "ram_mb": (int, None), "accelerator": (str, ACCELERATORS),
    "delegate": (str, DELEGATES), "threads": (int, None), "speed_factor": ((int, float), None),
    "link_mbps": ((int, float), None), "runtime": (str, RUNTIMES), "quantizations": (list, None),
    "preferred_quantization": (str, QUANTIZATIONS), "max_model_mb": (int, None),
}


def parse_profile(data: dict[str, Any], source: str) -> Profile:
    unknown = set(data) - set(_SPEC)
    if unknown:
        raise ProfileError(f"profile {source}: unknown field(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, (typ, choices) in _SPEC.items():
        if key not in data:
            raise ProfileError(f"profile {source}: field {key!r} is missing")
        v = data[key]
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ProfileError(f"profile {source}: field {key!r} has the wrong type ({type(v).__name__})")
        if choices is not None and v not in choices:
            raise ProfileError(f"profile {source}: field {key!r} is {v!r}, expected one of {', '.join(choices)}")
        if isinstance(v, (int, float)) and not v > 0:
            raise ProfileError(f"profile {source}: field {key!r} must be > 0")
        values[key] = v
    bad = [q for q in values["quantizations"] if q not in QUANTIZATIONS]
    if bad or not values["quantizations"]:
        raise ProfileError(f"profile {source}: quantizations must be a non-empty subset of {', '.join(QUANTIZATIONS)}")
    if values["preferred_quantization"] not in values["quantizations"]:
        raise ProfileError(f"profile {source}: preferred_quantization is not in quantizations")
    values["quantizations"] = tuple(values["quantizations"])
    values["speed_factor"], values["link_mbps"] = float(values["speed_factor"]), float(values["link_mbps"])
    return Profile(**values, source=source)


def _load_file(path: Path, source: str) -> Profile:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"profile {source} is unreadable: {exc}") from None
    prof = parse_profile(data, source)
    if prof.name != path.stem:
        raise ProfileError(f"profile {source}: name {prof.name!r} must match the file name {path.stem!r}")
    return prof


def load_profiles(extra_dir: str | Path | None = None) -> dict[str, Profile]:
    """All profiles: the shipped ones, then ``$EDGECTL_PROFILES`` / ``extra_dir`` overriding."""
    found: dict[str, Profile] = {}
    shipped = resources.files("devices") / "profiles"
    for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            with resources.as_file(entry) as path:
                found[path.stem] = _load_file(path, f"devices/profiles/{entry.name}")
    for d in (os.environ.get("EDGECTL_PROFILES"), extra_dir):
        if d:
            for path in sorted(Path(d).glob("*.toml")):
                found[path.stem] = _load_file(path, str(path))
    return found


def get_profile(name: str, extra_dir: str | Path | None = None) -> Profile:
    profiles = load_profiles(extra_dir)
    if name not in profiles:
        raise ProfileError(f"unknown device profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]
