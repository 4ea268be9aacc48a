"""Who serves what: the roles of a distributed deployment (pure; no database, no MQTT).

A bundle pushed as a **service** is served on shared request topics (``topics.service_group``):

* a model with ``replicas=R``: R devices run it behind one request topic (data parallel);
* a pipeline bundle with K stages (``edgectl partition``): K devices, one stage each, the output
  of stage k published to stage k+1's topic (model parallel);
* both: R replicas of every stage (R × K devices).

Which device runs which stage:

1. ``stage_map`` pins (``--stage-map pi-a=1,pi-b=2``) come first;
2. then a device whose profile is the one the planner planned that stage for
   (``manifest.pipeline.stages[k].device``) takes it, heaviest stage first;
3. then the heaviest remaining stage (predicted compute) goes to the fastest remaining device
   (lowest profile ``speed_factor``; a device without a known profile counts as 1.0).

When the selector picks more devices than needed, online devices are preferred, then faster
ones, then by id; the deployment targets only the devices chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdk.protocol.errors import DeployError
from sdk.protocol.topics import valid_id

MAX_STAGES = 64


@dataclass(frozen=True)
class Candidate:
    id: str
    online: bool = True
    profile: str = ""


@dataclass(frozen=True)
class Placement:
    #: device id -> {"file", "service", "stage", "stages"} (``store.ROLE_FIELDS``)
    roles: dict[str, dict[str, Any]]
    #: device id -> why it got its stage, in words
    why: dict[str, str]
    service: str
    stages: int
    replicas: int


def is_service(manifest: Mapping[str, Any], service: str | None, replicas: int | None,
               stage_map: Mapping[str, int] | None) -> bool:
    """Does this push make a service (shared topics) rather than a plain deployment?"""
    return bool(manifest.get("pipeline")) or service is not None or replicas is not None or bool(stage_map)


def place(manifest: Mapping[str, Any], candidates: Sequence[Candidate], *, service: str | None = None,
          replicas: int | None = None, stage_map: Mapping[str, int] | None = None,
          speed_of: Callable[[str], float | None] = lambda _: None, selector: str = "") -> Placement:
    """Choose the devices of a service deployment and each one's role; DeployError when impossible."""
    pipe = manifest.get("pipeline") or None
    entries: list[Mapping[str, Any]] = list(pipe["stages"]) if pipe else [{"file": "", "device": ""}]
    k = len(entries)
    pins = dict(stage_map or {})
    sel = f" (selector {selector!r})" if selector else ""
    name = service if service is not None else str(manifest.get("name", ""))
    if not valid_id(name):
        raise DeployError(f"service name {name!r} is not an id (letters, digits, '_', '.', '-', at most 64): "
                          + ("pass --service NAME" if service is None else "choose another"))
    if k > MAX_STAGES:
        raise DeployError(f"the pipeline has {k} stages; at most {MAX_STAGES} are supported")
    if replicas is not None and not 1 <= replicas <= 1000:
        raise DeployError(f"--replicas must be between 1 and 1000, not {replicas}")
    n = len(candidates)
    r = replicas if replicas is not None else (1 if pipe else n)
    need = r * k
    what = f"a {k}-stage pipeline with {r} replica(s) per stage" if pipe else f"{r} replica(s)"
    if n < need:
        raise DeployError(f"{what} needs {need} devices; the selector picks {n}{sel}")
    by_id = {c.id: c for c in candidates}
    for dev, stage in pins.items():
        if dev not in by_id:
            raise DeployError(f"--stage-map names {dev}, which the selector does not pick{sel}")
        if not 1 <= stage <= k:
            raise DeployError(f"--stage-map puts {dev} on stage {stage}; the bundle has stage(s) 1..{k}")
    for stage in range(1, k + 1):
        pinned = sum(1 for s in pins.values() if s == stage)
        if pinned > r:
            raise DeployError(f"--stage-map puts {pinned} devices on stage {stage}; with {r} replica(s) "
                              f"at most {r} (use --replicas)")

    def speed(c: Candidate) -> float:
        value = speed_of(c.profile) if c.profile else None
        return value if value is not None and value > 0 else 1.0

    stage_of: dict[str, int] = dict(pins)
    why = {d: "pinned by --stage-map" for d in pins}
    open_slots = {s: r - sum(1 for p in pins.values() if p == s) for s in range(1, k + 1)}
    pool = sorted((c for c in candidates if c.id not in pins), key=lambda c: (not c.online, speed(c), c.id))

    def weight(s: int) -> float:
        w = entries[s - 1].get("predicted_compute_ms")
        return float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else 0.0

    heavy_first = sorted(range(1, k + 1), key=lambda s: (-weight(s), s))
    # 2. the profile the planner planned the stage for
    for s in heavy_first:
        planned = str(entries[s - 1].get("device") or "")
        if not planned or planned == "host":
            continue
        for c in list(pool):
            if open_slots[s] == 0:
                break
            if c.profile == planned:
                stage_of[c.id], why[c.id] = s, f"profile {planned} is the one stage {s} was planned for"
                open_slots[s] -= 1
                pool.remove(c)
    # 3. heaviest remaining stage -> fastest remaining device (pool is fastest first)
    slots = [s for s in heavy_first for _ in range(open_slots[s])]
    for s, c in zip(slots, pool, strict=False):
        stage_of[c.id] = s
        why[c.id] = (f"stage {s} ({weight(s):.3g} ms predicted) on a device of speed factor {speed(c):g}"
                     if pipe else "replica")
    roles = {d: {"file": str(entries[s - 1]["file"]) if pipe else "", "service": name, "stage": s, "stages": k}
             for d, s in sorted(stage_of.items())}
    return Placement(roles=roles, why={d: why[d] for d in roles}, service=name, stages=k, replicas=r)
