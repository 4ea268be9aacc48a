"""Download progress that survives a restart: a small JSON sidecar next to the ``.part`` file.

``DIR/downloads/<sha>.part`` holds the chunks at their offsets; ``<sha>.progress.json`` says
which of them are really there::

    {"artifact": sha, "deployment_id": "d-1", "size": 46408, "chunk_size": 1024,
     "received": [[0, 15], [32, 40]],            # inclusive index ranges
     "stage": "downloading" | "verifying" | "smoke_testing",
     "restarted": false}                         # already restarted from zero once

The agent fsyncs the ``.part`` file *before* it writes the sidecar (atomically, with
:func:`sdk.protocol.fsutil.write_atomic`), so a chunk listed here is on disk; a chunk written
after the last checkpoint is simply fetched again. Chunks carry no hash in the desired state, so
a reused chunk is trusted until the whole-file sha256 check: on a mismatch a resumed download
restarts from zero, once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.protocol.fsutil import write_atomic

log = logging.getLogger("edgectl.agent.resume")

SUFFIX = ".progress.json"
STAGES = ("downloading", "verifying", "smoke_testing")


@dataclass
class Progress:
    artifact: str
    deployment_id: str
    size: int
    chunk_size: int
    received: set[int] = field(default_factory=set)
    stage: str = "downloading"
    restarted: bool = False

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def to_json(self) -> bytes:
        return json.dumps({"artifact": self.artifact, "deployment_id": self.deployment_id,
                           "size": self.size, "chunk_size": self.chunk_size,
                           "received": to_ranges(self.received), "stage": self.stage,
                           "restarted": self.restarted}, separators=(",", ":")).encode()


def to_ranges(indexes: Iterable[int]) -> list[list[int]]:
    """``{0, 1, 2, 5}`` -> ``[[0, 2], [5, 5]]``: compact when chunks arrive roughly in order."""
    out: list[list[int]] = []
    for i in sorted(indexes):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def from_ranges(ranges: Any, count: int) -> set[int]:
    """The inverse of :func:`to_ranges`; raises ValueError unless every range is inside [0, count)."""
    if not isinstance(ranges, list):
        raise ValueError("received is not a list")
    out: set[int] = set()
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)
                and 0 <= r[0] <= r[1] < count):
            raise ValueError(f"received range {str(r)[:40]} is not inside [0, {count})")
        out.update(range(r[0], r[1] + 1))
    return out


def sidecar(part: Path) -> Path:
    return part.with_name(part.name.removesuffix(".part") + SUFFIX)


def save(part: Path, progress: Progress) -> None:
    """Record progress atomically (the caller has fsynced the ``.part`` file first)."""
    write_atomic(sidecar(part), progress.to_json())


def load(part: Path) -> Progress | None:
    """The recorded progress of ``part``, or None (logged) when it is missing, unreadable or
    does not match the ``.part`` file."""
    path = sidecar(part)
    try:
        raw = json.loads(path.read_bytes())
        p = Progress(artifact=str(raw["artifact"]), deployment_id=str(raw["deployment_id"]),
                     size=int(raw["size"]), chunk_size=int(raw["chunk_size"]),
                     stage=str(raw.get("stage", "downloading")), restarted=bool(raw.get("restarted", False)))
        if p.size <= 0 or p.chunk_size <= 0 or p.stage not in STAGES:
            raise ValueError("size, chunk_size or stage out of range")
        p.received = from_ranges(raw["received"], p.chunk_count)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("download progress %s is unusable (%s); that download starts from zero", path, exc)
        return None
    try:
        size = part.stat().st_size
    except OSError:
        size = -1
    if size != p.size:
        log.warning("partial download %s is %d bytes, its progress says %d; it starts from zero", part, size, p.size)
        return None
    return p
