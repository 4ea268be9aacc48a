"""The lean install, for real: a separate venv with only ``edgectl[agent]`` (ai-edge-litert,
numpy 2) or ``edgectl[agent-tflite]`` (tflite-runtime 2.14, numpy 1.x), the agent run from it
against a real Mosquitto and the real ``edgectl-server``, and a push of two bundles:

* float32 digits: loads on both runtimes, answers inference correctly;
* dynamic-range digits (TF 2.21 emits FULLY_CONNECTED v12): active on LiteRT; refused by
  tflite-runtime 2.14 with the reason, while the float32 model keeps answering.

The venvs are built from a copy of the sources (non-editable, like a user's ``pip install``) and
cached under the temp dir, keyed by a hash of those sources: a cold build of both takes ~15 s
(in parallel), a warm run none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdk.client import ServerClient
from sdk.deploy import push_bundle
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, stop_process, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "sdk", "agent", "server", "devices")
CACHE = Path(tempfile.gettempdir()) / "edgectl-lean-venvs"
HEAVY = ("tensorflow", "keras", "sqlalchemy", "fastapi", "typer", "rich", "pydantic", "httpx", "sklearn",
         "uvicorn", "psycopg")
#: extra -> (runtime import name, profile the agent runs with)
EXTRAS = {"agent": ("ai_edge_litert", "raspberry-pi-4"), "agent-tflite": ("tflite_runtime", "coral-dev-board")}


def _source_files() -> list[Path]:
    files = []
    for name in SOURCES:
        p = REPO / name
        files += [p] if p.is_file() else sorted(
            f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts and not f.name.endswith(".pyc"))
    return files


def _source_key() -> str:
    h = hashlib.sha256()
    for f in _source_files():
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class LeanVenv:
    extra: str
    path: Path
    python: Path
    build_s: float  # 0 when it came from the cache


def _copy_sources(dest: Path) -> None:
    for f in _source_files():
        target = dest / f.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)


@pytest.fixture(scope="module")
def lean_venvs() -> Iterator[dict[str, LeanVenv]]:
    """Both lean venvs, built in parallel when not cached (a file lock guards concurrent runs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    key = _source_key()
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for old in CACHE.iterdir():  # keep the cache to the current sources
            if old.is_dir() and not old.name.startswith(key):
                shutil.rmtree(old, ignore_errors=True)
        venvs: dict[str, LeanVenv] = {}
        todo: dict[str, tuple[subprocess.Popen[str], float, Path]] = {}
        src = CACHE / f"{key}-src"
        for extra in EXTRAS:
            path = CACHE / f"{key}-{extra}"
            if (path / ".complete").exists():
                venvs[extra] = LeanVenv(extra, path, path / "bin" / "python", 0.0)
                continue
            if not src.exists():
                _copy_sources(src)
            shutil.rmtree(path, ignore_errors=True)
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
            # The project's own pip installs into the new venv (pip >= 22.3 --python): no ensurepip.
            proc = subprocess.Popen(
                [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install",
                 "--disable-pip-version-check", "--quiet", "--no-compile", f"{src}[{extra}]"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            todo[extra] = (proc, t0, path)
        for extra, (proc, t0, path) in todo.items():
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"pip install edgectl[{extra}] failed:\n{out[-3000:]}"
            (path / ".complete").write_text("")
            venvs[extra] = LeanVenv(extra, path, path / "bin" / "python", time.monotonic() - t0)
    yield venvs


def _run(python: Path, code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_the_lean_venv_holds_only_numpy_paho_and_a_runtime(
        lean_venvs: dict[str, LeanVenv], extra: str, tmp_path: Path) -> None:
    venv = lean_venvs[extra]
    runtime, _ = EXTRAS[extra]
    dists = json.loads(_run(venv.python, "import json, importlib.metadata as m; "
                                         "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))",
                            tmp_path))
    assert not {d.replace("_", "-") for d in dists} & {"tensorflow", "tensorflow-cpu", "keras", "sqlalchemy",
                                                      "typer", "rich", "fastapi", "pydantic", "httpx"}, dists
    probe = ("import sys, json, agent.main, agent.core, agent.sim\n"
             "from sdk.protocol.runtime import select_backend\n"
             "b = select_backend()[0]\n"
             "import numpy\n"
             "print(json.dumps({'mods': sorted({m.split('.')[0] for m in sys.modules}), 'agent': agent.__file__,"
             " 'backend': b.module, 'version': b.version(), 'numpy': numpy.__version__}))")
    got = json.loads(_run(venv.python, probe, tmp_path))
    # Signature checks (--trusted-key) work in the lean venv: cryptography is part of the extra.
    kid = _run(venv.python, "from sdk.protocol import signing; _, pub = signing.generate_keys('keys'); "
                            "print(next(iter(signing.trusted_keys([pub]))))", tmp_path)
    assert len(kid) == 16, kid
    assert str(venv.path) in got["agent"], "the agent must come from the venv, not the work tree"
    assert not set(got["mods"]) & set(HEAVY), set(got["mods"]) & set(HEAVY)
    assert got["backend"] == runtime
    assert got["numpy"].startswith("2." if extra == "agent" else "1.")
    print(f"\n{extra}: {got['backend']} {got['version']}, numpy {got['numpy']}, "
          f"venv {_size(venv.path) / 1e6:.0f} MB, built in {venv.build_s:.1f} s (0 = cached)")


# -- the agent from the lean venv, the real server, a real Mosquitto ------------------------------
@dataclass(frozen=True)
class Bundles:
    float32: Path
    dynamic: Path


@pytest.fixture(scope="module")
def bundles(digits: Any, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    from sdk.compress import compress

    out = tmp_path_factory.mktemp("lean-bundles") / "digits-f32.bundle"
    compress(digits.model, out, quantize="none", name="digits", version="0.9.0")
    return Bundles(out, digits.bundle)


@pytest.fixture(scope="module")
def fleet(mosquitto: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path_factory.mktemp("lean-fleet")) as f:
        f.start_server(broker=mosquitto.url)
        yield f


def _deploy(fleet: LocalFleet, bundle: Path, device: str) -> dict[str, Any]:
    with ServerClient(fleet.url) as client:
        result = push_bundle(client, bundle, f"device:{device}", wait_s=40)
    assert not result.get("incomplete"), result
    (state,) = result["deployment"]["devices"]
    return state


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_the_agent_runs_from_the_lean_venv(lean_venvs: dict[str, LeanVenv], extra: str, fleet: LocalFleet,
                                           bundles: Bundles, digits: Any, tmp_path: Path) -> None:
    venv = lean_venvs[extra]
    runtime, profile = EXTRAS[extra]
    device = f"lean-{extra}-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    (tmp_path / "agent.toml").write_text(
        f'device_id = "{device}"\nbroker = "{fleet.broker}"\ndata = "{tmp_path / "data"}"\n'
        f'profile = "{profile}"\ntelemetry_interval = 1\nheartbeat = 1\n[labels]\ngroup = "lean"\n')
    with open(log, "wb") as err:
        # The console script, as systemd would start it (run through the venv's python: the cached
        # venv may have been built under another path name).
        proc = subprocess.Popen([str(venv.python), str(venv.path / "bin" / "edgectl-agent"),
                                 "--config", str(tmp_path / "agent.toml")],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        fleet.wait_online([device], timeout=30)
        first = _deploy(fleet, bundles.float32, device)
        assert first["state"] == "active", first
        eval_data = np.load(digits.eval)
        x, y = eval_data["x"][:20].astype(np.float32), eval_data["y"][:20]
        with InferenceClient(fleet.broker) as ic:
            answers = [ic.infer(device, x[i:i + 1], timeout=10) for i in range(len(x))]
            assert all(a.ok and a.model_version == "0.9.0" for a in answers), answers[:2]
            accuracy = float(np.mean([int(np.argmax(a.output)) == int(t) for a, t in zip(answers, y, strict=True)]))
            assert accuracy >= 0.8, accuracy
            second = _deploy(fleet, bundles.dynamic, device)
            after = ic.infer(device, x[:1], timeout=10)
        if runtime == "tflite_runtime":
            assert second["state"] == "failed", second
            assert "(tflite_runtime 2.14.0) cannot load the model" in second["detail"], second
            assert "FULLY_CONNECTED" in second["detail"] and "'12'" in second["detail"], second
            assert after.ok and after.model_version == "0.9.0", "the previous model must keep serving"
        else:
            assert second["state"] == "active", second
            assert after.ok and after.model_version == "1.0.0"

        # The agent's own telemetry carries its health: read it off the broker (what the server gets).
        from sdk.protocol import messages, topics
        got = _last_telemetry(fleet.broker, topics.telemetry(device))
        t = messages.decode("telemetry", got)
        assert t.health is not None
        assert t.health["runtime"] == runtime and t.health["restarts"] == 0
        assert t.health["threads"] == 4 and t.health["profile"] == profile
        assert t.health["disk_free_bytes"] > 0 and t.health["uptime_s"] > 0
        if profile == "coral-dev-board":  # no Edge TPU here: the CPU path, said in the log
            assert t.health["delegate"] == "xnnpack"
            wait_for("the delegate fallback message", lambda: "edgetpu delegate libedgetpu.so.1 is not available"
                     in log.read_text(errors="replace"), timeout=5)
    finally:
        code = stop_process(proc)
        assert code == 0, log.read_text(errors="replace")[-3000:]


def _last_telemetry(broker: str, topic: str, timeout: float = 10.0) -> bytes:
    import threading

    import paho.mqtt.client as mqtt

    from sdk.protocol.net import parse_broker_url

    host, port = parse_broker_url(broker)
    got: list[bytes] = []
    ev = threading.Event()
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got.append(bytes(msg.payload))
        ev.set()

    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
    c.connect(host, port)
    c.loop_start()
    try:
        assert ev.wait(timeout), f"no telemetry on {topic} within {timeout}s"
    finally:
        with contextlib.suppress(Exception):
            c.disconnect()
        c.loop_stop()
    return got[-1]
