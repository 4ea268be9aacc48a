"""The agent's data directory: persisted state, A/B model slots and partial downloads.

Layout::

    DIR/state.json             {"active_slot", "previous_slot", "active", "previous", "next_seq"}
    DIR/slots/a/bundle.zip     one verified bundle per slot
    DIR/slots/b/bundle.zip
    DIR/downloads/<sha>.part   an artifact being downloaded (preallocated, written by offset)
    DIR/downloads/<sha>.progress.json   which of its chunks are on disk (agent.resume)
    DIR/outbox/<seq>.msg       telemetry not yet acknowledged by the broker (agent.outbox)

Every write is atomic (temp file, fsync, ``os.replace``, fsync of the directory). Activation
first marks the slot it is about to overwrite as unusable, then writes the new bundle into it,
then flips ``state.json``: a crash at any point leaves ``active_slot`` naming a complete,
verified bundle (the old one or the new one), never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdk.protocol.bundle import Bundle, read_bundle
from sdk.protocol.errors import BundleError
from sdk.protocol.fsutil import write_atomic as atomic_write
from sdk.protocol.messages import ActiveModel

from . import resume
from .faults import crash_point

log = logging.getLogger("edgectl.agent.slots")

SLOTS = ("a", "b")
BUNDLE = "bundle.zip"


def _model_from(data: Any) -> ActiveModel | None:
    if not isinstance(data, dict):
        return None
    try:
        return ActiveModel(deployment_id=data.get("deployment_id"), artifact=str(data["artifact"]),
                           name=str(data["name"]), version=str(data["version"]),
                           file=str(data.get("file") or ""), service=str(data.get("service") or ""),
                           stage=int(data.get("stage") or 0), stages=int(data.get("stages") or 0))
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class Loaded:
    """A verified bundle from a slot, with the model description that goes on the wire."""

    slot: str
    bundle: Bundle
    model: ActiveModel


class DataDir:
    """The agent's persistent state; every method that writes holds one lock (the deployment
    worker activates while the telemetry thread takes sequence numbers)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.slots_dir = self.root / "slots"
        self.downloads = self.root / "downloads"
        for d in (self.root, self.downloads, *(self.slots_dir / s for s in SLOTS)):
            d.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self._lock = threading.RLock()
        self.state = self._read_state()

    # -- state.json --------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        default: dict[str, Any] = {"active_slot": None, "previous_slot": None, "active": None,
                                   "previous": None, "next_seq": 0}
        try:
            data = json.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return default
        except (OSError, ValueError) as exc:
            log.error("state file %s is unreadable (%s); starting without an active model",
                      self.state_path, exc)
            return default
        if not isinstance(data, dict):
            log.error("state file %s is not a JSON object; starting without an active model",
                      self.state_path)
            return default
        state = {**default, **data}
        for key in ("active_slot", "previous_slot"):
            if state[key] not in (*SLOTS, None):
                log.error("state file %s: %s %r is not a slot; ignoring it", self.state_path, key, state[key])
                state[key] = None
        seq = state["next_seq"]
        state["next_seq"] = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else 0
        return state

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write(self.state_path, json.dumps(state, indent=2, sort_keys=True).encode())
        self.state = state

    def record_start(self) -> int:
        """Count this start of the agent (persisted); returns how many starts came before it."""
        with self._lock:
            starts = self.state.get("starts", 0)
            starts = starts if isinstance(starts, int) and not isinstance(starts, bool) and starts >= 0 else 0
            self._save({**self.state, "starts": starts + 1})
            return starts

    def take_seq(self) -> int:
        """The next telemetry sequence number, persisted before it is returned so that seq
        stays strictly increasing across restarts."""
        with self._lock:
            seq = int(self.state["next_seq"])
            self._save({**self.state, "next_seq": seq + 1})
            return seq

    # -- slots -------------------------------------------------------------------------------
    def slot_path(self, slot: str) -> Path:
        return self.slots_dir / slot / BUNDLE

    def part_path(self, artifact: str) -> Path:
        return self.downloads / f"{artifact}.part"

    def clean_downloads(self) -> list[resume.Progress]:
        """At start: remove what a killed run left behind (temp files of atomic writes, partial
        downloads without usable progress) and return the resumable downloads that are kept."""
        for d in (self.root, self.downloads, *(self.slots_dir / s for s in SLOTS)):
            for tmp in d.glob("*.tmp"):
                log.info("removing the temp file %s of an interrupted write", tmp)
                with contextlib.suppress(OSError):
                    tmp.unlink()
        kept: list[resume.Progress] = []
        for p in sorted(self.downloads.glob("*.part")):
            progress = resume.load(p)
            if progress is not None and p.name == f"{progress.artifact}.part":
                kept.append(progress)
                continue
            log.info("removing stale partial download %s (no usable progress)", p)
            self.discard_download(p.name.removesuffix(".part"))
        for side in self.downloads.glob(f"*{resume.SUFFIX}"):
            if not self.part_path(side.name.removesuffix(resume.SUFFIX)).exists():
                with contextlib.suppress(OSError):
                    side.unlink()
        return kept

    def discard_download(self, artifact: str) -> None:
        """Remove one partial download and its progress."""
        part = self.part_path(artifact)
        for p in (part, resume.sidecar(part)):
            with contextlib.suppress(OSError):
                p.unlink()

    def discard_other_downloads(self, artifact: str) -> None:
        """Keep at most one partial download: the one of ``artifact``."""
        for p in self.downloads.glob("*.part"):
            if p.name != f"{artifact}.part":
                log.info("removing the partial download %s: another artifact is wanted now", p.name)
                self.discard_download(p.name.removesuffix(".part"))

    def _load_slot(self, slot: str | None, meta: Any) -> Loaded:
        if slot is None:
            raise BundleError("no slot is recorded")
        bundle = read_bundle(self.slot_path(slot))
        model = _model_from(meta)
        if model is None or model.artifact != bundle.sha256:
            # The slot holds a valid bundle the state does not describe: describe it from itself.
            model = ActiveModel(deployment_id=None, artifact=bundle.sha256,
                                name=str(bundle.manifest["name"]), version=str(bundle.manifest["version"]))
        return Loaded(slot=slot, bundle=bundle, model=model)

    def load(self) -> Loaded | None:
        """The active slot's verified bundle; if it is unusable, the previous slot's (and the
        state is rewritten to point at it); ``None`` when neither is usable."""
        with self._lock:
            return self._load()

    def _load(self) -> Loaded | None:
        st = self.state
        if st["active_slot"] is None:
            return None
        try:
            return self._load_slot(st["active_slot"], st["active"])
        except BundleError as exc:
            log.error("active slot %s is unusable (%s); falling back to the previous slot %s",
                      st["active_slot"], exc, st["previous_slot"])
        try:
            loaded = self._load_slot(st["previous_slot"], st["previous"])
        except BundleError as exc:
            log.error("previous slot %s is unusable too (%s); starting without an active model",
                      st["previous_slot"], exc)
            return None
        self._save({**st, "active_slot": loaded.slot, "active": asdict(loaded.model),
                    "previous_slot": None, "previous": None})
        return loaded

    def previous(self, artifact: str) -> Loaded | None:
        """The previous slot's verified bundle when it is ``artifact`` (what a rollback returns
        to), else None; an unusable previous slot is logged and gives None too."""
        with self._lock:
            st = self.state
            meta = _model_from(st["previous"])
            if st["previous_slot"] is None or meta is None or meta.artifact != artifact:
                return None
            try:
                return self._load_slot(st["previous_slot"], st["previous"])
            except BundleError as exc:
                log.warning("previous slot %s is unusable (%s)", st["previous_slot"], exc)
                return None

    def reactivate_previous(self, model: ActiveModel) -> str:
        """Make the previous slot active again, described by ``model`` (a rollback without
        download); the slot that was active becomes the previous one, so a roll-forward needs
        no download either. One atomic state write; returns the slot now active."""
        with self._lock:
            st = self.state
            slot = st["previous_slot"]
            if slot is None:
                raise OSError(f"no previous slot to return to in {self.state_path}")
            self._save({**st, "active_slot": slot, "active": asdict(model),
                        "previous_slot": st["active_slot"], "previous": st["active"]})
            return slot

    def retag(self, model: ActiveModel) -> None:
        """Record a new description (deployment, role) of the model in the active slot."""
        with self._lock:
            if self.state["active_slot"] is None:
                raise OSError("no active slot to retag")
            self._save({**self.state, "active": asdict(model)})

    def activate(self, data: bytes, model: ActiveModel) -> str:
        """Install a verified bundle into the inactive slot and make it the active one.

        Returns the slot used. Raises OSError (e.g. disk full) with the old model still active.
        """
        with self._lock:
            return self._activate(data, model)

    def _activate(self, data: bytes, model: ActiveModel) -> str:
        st = self.state
        old = st["active_slot"]
        slot = "b" if old == "a" else "a"
        if st["previous_slot"] == slot:
            # That slot is about to be overwritten: it is no longer a valid fallback.
            self._save({**st, "previous_slot": None, "previous": None})
            crash_point("swap.slot_invalidated")
        atomic_write(self.slot_path(slot), data)
        crash_point("swap.slot_written")
        self._save({**self.state, "active_slot": slot, "active": asdict(model),
                    "previous_slot": old, "previous": self.state["active"] if old else None})
        return slot
