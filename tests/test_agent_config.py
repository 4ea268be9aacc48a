"""The agent's config file, profiles, restart count, health and the systemd notify protocol."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.health import SystemdNotifier, temperature_c
from agent.main import main
from sdk.protocol import histogram, messages
from sdk.protocol.errors import ProtocolError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "words"), [
    ('device_id = "pi-1"\ndata = "d"\nbrokr = "mqtt://x"\n', "unknown key 'brokr'"),
    ('device_id = "pi-1"\ndata = "d"\nheartbeat = "fast"\n', "key 'heartbeat' must be int or float"),
    ('device_id = "a b"\ndata = "d"\n', "device_id: invalid device id"),
    ('device_id = "pi-1"\ndata = "d"\nprofile = "pi-9"\n', "unknown device profile 'pi-9'"),
    ('device_id = "pi-1"\n[labels]\ngroup = "lab"\n', "--data is required"),
    ("device_id = [", "is not valid TOML"),
])
def test_a_bad_config_file_exits_2_with_one_line(tmp_path: Path, text: str, words: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(conf)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgectl-agent: error:") and words in err, err


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--config", "/nonexistent/agent.toml"])
    assert "config file /nonexistent/agent.toml does not exist" in capsys.readouterr().err


def test_temperature_from_a_thermal_tree(tmp_path: Path) -> None:
    for i, (kind, milli) in enumerate([("gpu-thermal", 61000), ("cpu-thermal", 48312)]):
        (tmp_path / f"thermal_zone{i}").mkdir()
        (tmp_path / f"thermal_zone{i}" / "type").write_text(kind + "\n")
        (tmp_path / f"thermal_zone{i}" / "temp").write_text(f"{milli}\n")
    assert temperature_c(tmp_path) == 48.3  # the CPU zone, not the first
    assert temperature_c(tmp_path / "missing") is None


def _telemetry(**health: Any) -> bytes:
    return json.dumps({"seq": 1, "interval_s": 1.0, "count": 0, "errors": 0,
                       "latency_hist": histogram.empty(), "latency_sum_ms": 0.0, "health": health}).encode()


def test_health_in_telemetry_is_validated() -> None:
    t = messages.decode("telemetry", _telemetry(temp_c=48.3, restarts=2, runtime="ai_edge_litert"))
    assert t.health == {"temp_c": 48.3, "restarts": 2, "runtime": "ai_edge_litert"}
    for bad in ({"nested": {"a": 1}}, {"bad key": 1}, {"flag": True}, {"s": "x" * 129}):
        with pytest.raises(ProtocolError, match="health"):
            messages.decode("telemetry", _telemetry(**bad))


def test_notifier_parses_the_environment() -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "30000000"})
    assert n.address == "\0abstract" and n.watchdog_s == 15.0
    off = SystemdNotifier({})
    assert not off.enabled and off.watchdog_s is None and off.notify("READY=1") is False


@pytest.mark.integration
def test_the_agent_speaks_sd_notify_counts_restarts_and_takes_flags_over_the_file(
        mosquitto: Any, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    device = f"cfg-{uuid.uuid4().hex[:6]}"
    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "overridden"\nbroker = "{mosquitto.url}"\ndata = "{tmp_path / "data"}"\n'
                    'profile = "raspberry-pi-5"\n[labels]\ngroup = "lab"\n')
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    try:
        for start in (1, 2):
            log = tmp_path / f"agent{start}.log"
            with open(log, "wb") as err:
                proc = subprocess.Popen([sys.executable, "-m", "agent.main", "--config", str(conf),
                                         "--device-id", device, "--threads", "2"],
                                        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
            got: list[str] = []
            try:
                deadline = time.monotonic() + 15
                while got.count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
                    got.append(sock.recv(256).decode())
                assert got[0] == "READY=1" and got.count("WATCHDOG=1") >= 2, got
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(15) == 0
                while "STOPPING=1" not in got:
                    got.append(sock.recv(256).decode())
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            text = log.read_text()
            assert f"device {device}," in text and "profile raspberry-pi-5" in text, text
            assert "2 thread(s)" in text and f"start #{start}" in text, text
    finally:
        sock.close()
