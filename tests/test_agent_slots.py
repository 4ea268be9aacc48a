"""The agent's data dir: atomic state writes, A/B activation, fallback to the previous slot."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from agent import slots
from agent.slots import DataDir, atomic_write
from sdk.protocol import fsutil
from sdk.protocol.bundle import sha256_bytes, tensor_spec, write_bundle
from sdk.protocol.frames import tensor_to_npy
from sdk.protocol.messages import ActiveModel


def make_bundle(tmp_path: Path, version: str) -> tuple[bytes, ActiveModel]:
    """A structurally valid bundle (slots never load the model, so its bytes can be anything)."""
    manifest = {
        "name": "m", "version": version, "quantization": "none",
        "model": {"file": "model.tflite", "inputs": [tensor_spec("x", [1, 4], "float32")],
                  "outputs": [tensor_spec("y", [1, 3], "float32")]},
        "sample": {"input": "in.npy", "output": "out.npy", "atol": 1e-5, "rtol": 1e-5},
    }
    files = {"model.tflite": f"not a real model {version}".encode(),
             "in.npy": tensor_to_npy(np.zeros((1, 4), np.float32)),
             "out.npy": tensor_to_npy(np.zeros((1, 3), np.float32))}
    path = tmp_path / f"b-{version}.zip"
    sha = write_bundle(path, manifest, files)
    data = path.read_bytes()
    assert sha256_bytes(data) == sha
    return data, ActiveModel(deployment_id=f"dep-{version}", artifact=sha, name="m", version=version)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_atomic_write_failure_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "state.json"
    atomic_write(p, b"old")

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", boom)  # the shared atomic writer the agent uses
    with pytest.raises(OSError):
        atomic_write(p, b"new")
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_fresh_dir_has_no_model_and_seq_persists(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    assert d.load() is None
    assert [d.take_seq() for _ in range(3)] == [0, 1, 2]
    again = DataDir(tmp_path / "data")
    assert again.take_seq() == 3
    state = json.loads((tmp_path / "data" / "state.json").read_text())
    assert state["next_seq"] == 4 and state["active_slot"] is None


def test_activation_alternates_slots_and_survives_restart(tmp_path: Path) -> None:
    d = DataDir(tmp_path)
    b1, m1 = make_bundle(tmp_path, "1")
    b2, m2 = make_bundle(tmp_path, "2")
    assert d.activate(b1, m1) == "a"
    assert d.activate(b2, m2) == "b"
    st = json.loads(d.state_path.read_text())
    assert (st["active_slot"], st["previous_slot"]) == ("b", "a")
    assert st["active"]["artifact"] == m2.artifact and st["previous"]["artifact"] == m1.artifact
    loaded = DataDir(tmp_path).load()
    assert loaded is not None and loaded.slot == "b" and loaded.model == m2
    # A third activation overwrites the oldest slot, never the active one.
    b3, m3 = make_bundle(tmp_path, "3")
    assert d.activate(b3, m3) == "a"
    assert d.slot_path("b").read_bytes() == b2


def test_corrupt_active_slot_falls_back_to_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = DataDir(tmp_path)
    b1, m1 = make_bundle(tmp_path, "1")
    b2, m2 = make_bundle(tmp_path, "2")
    d.activate(b1, m1)
    d.activate(b2, m2)
    bad = bytearray(d.slot_path("b").read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    d.slot_path("b").write_bytes(bytes(bad))
    with caplog.at_level(logging.ERROR, logger="edgectl.agent.slots"):
        loaded = DataDir(tmp_path).load()
    assert loaded is not None and loaded.slot == "a" and loaded.model == m1
    assert "active slot b is unusable" in caplog.text
    st = json.loads(d.state_path.read_text())
    assert st["active_slot"] == "a" and st["previous_slot"] is None


def test_both_slots_corrupt_means_no_model(tmp_path: Path) -> None:
    d = DataDir(tmp_path)
    b1, m1 = make_bundle(tmp_path, "1")
    d.activate(b1, m1)
    d.slot_path("a").write_bytes(b"garbage")
    assert DataDir(tmp_path).load() is None


def test_crash_between_slot_write_and_state_flip_keeps_old_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = DataDir(tmp_path)
    b1, m1 = make_bundle(tmp_path, "1")
    b2, m2 = make_bundle(tmp_path, "2")
    d.activate(b1, m1)
    real = slots.atomic_write

    def crash_on_state(path: Path, data: bytes) -> None:
        if path.name == "state.json":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(slots, "atomic_write", crash_on_state)
    with pytest.raises(OSError):
        d.activate(b2, m2)
    monkeypatch.setattr(slots, "atomic_write", real)
    loaded = DataDir(tmp_path).load()
    assert loaded is not None and loaded.model == m1


def test_stale_downloads_are_removed(tmp_path: Path) -> None:
    d = DataDir(tmp_path)
    part = d.part_path("ab" * 32)
    part.write_bytes(b"half")
    d.clean_downloads()
    assert not part.exists()


def test_the_previous_slot_is_reactivated_by_one_state_write(tmp_path: Path) -> None:
    d = DataDir(tmp_path)
    b1, m1 = make_bundle(tmp_path, "1")
    b2, m2 = make_bundle(tmp_path, "2")
    assert d.previous(m1.artifact) is None  # nothing installed yet
    d.activate(b1, m1)
    d.activate(b2, m2)
    assert d.previous(m2.artifact) is None  # the active one is not "previous"
    prev = d.previous(m1.artifact)
    assert prev is not None and prev.slot == "a" and prev.bundle.sha256 == m1.artifact
    back = ActiveModel(deployment_id="dep-back", artifact=m1.artifact, name="m", version="1")
    assert d.reactivate_previous(back) == "a"
    st = json.loads(d.state_path.read_text())
    assert (st["active_slot"], st["previous_slot"]) == ("a", "b")
    assert st["active"]["deployment_id"] == "dep-back" and st["previous"]["artifact"] == m2.artifact
    assert d.slot_path("a").read_bytes() == b1 and d.slot_path("b").read_bytes() == b2  # nothing rewritten
    loaded = DataDir(tmp_path).load()
    assert loaded is not None and loaded.model == back
    d.slot_path("b").write_bytes(b"garbage")
    assert d.previous(m2.artifact) is None  # unusable: the caller downloads instead
