"""TLS between devices and the broker: ``edgectl-server --broker local --secure --broker-tls-port``
adds a TLS listener for devices (certificate and CA made in the test); a real agent connects with
``mqtts://`` + ``--ca-file`` and its enrolled password, the operator's inference client too; plain
MQTT on the TLS port, and TLS against an unknown CA, are refused."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, wait_for
from sdk.protocol import EdgeError
from server.main import parse_config
from server.security import OPERATOR_USER
from tests.conftest import free_port
from tests.test_broker_security import make_tls

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFleet, int, Path]]:
    work = tmp_path_factory.mktemp("tls-fleet")
    ca, cert, key = make_tls(work)
    port = free_port()
    with LocalFleet(work / "fleet") as f:
        f.start_server(broker="local", extra=["--secure", "--broker-tls-port", str(port),
                                              "--broker-certfile", str(cert), "--broker-keyfile", str(key)])
        yield f, port, ca


def test_agent_and_operator_over_tls(tls_fleet: tuple[LocalFleet, int, Path], tmp_path: Path) -> None:
    fleet, port, ca = tls_fleet
    with fleet.client() as client:
        creds = client.enroll("tls-dev")
    (tmp_path / "pw").write_text(creds["password"] + "\n")
    (tmp_path / "agent.toml").write_text(
        f'username = "tls-dev"\npassword_file = "{tmp_path / "pw"}"\nca_file = "{ca}"\n')
    url = f"mqtts://127.0.0.1:{port}"
    fleet.start_agent("tls-dev", extra=["--broker", url, "--config", str(tmp_path / "agent.toml")])
    with fleet.client() as client:
        wait_for("tls-dev online", lambda: any(d["id"] == "tls-dev" and d["online"] for d in client.devices()),
                 timeout=20)
    operator_pw = (fleet.workdir / "server" / "broker" / "operator.password").read_text().strip()
    with InferenceClient(url, username=OPERATOR_USER, password=operator_pw, ca_file=str(ca)) as ic:
        answer = ic.infer("tls-dev", np.zeros((1, 4), np.float32), timeout=10)
    assert not answer.ok and "no model is active" in answer.error  # the agent answered, over TLS

    # Plain MQTT on the TLS port never gets a CONNACK.
    plain = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    plain.username_pw_set("tls-dev", creds["password"])
    accepted = threading.Event()
    plain.on_connect = lambda c, u, f, rc, p: accepted.set() if not rc.is_failure else None
    plain.connect("127.0.0.1", port)
    plain.loop_start()
    try:
        assert not accepted.wait(2.0)
    finally:
        plain.loop_stop()
    with pytest.raises(EdgeError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        InferenceClient(url, username=OPERATOR_USER, password=operator_pw, connect_timeout=5)  # system CAs
    conf = (fleet.workdir / "server" / "broker" / "mosquitto.conf").read_text()
    assert f"listener {port} 127.0.0.1" in conf and "certfile" in conf


def test_tls_settings_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ca.pem").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "agent.main", "--device-id", "d", "--data", str(tmp_path / "d"),
                           "--broker", "mqtt://127.0.0.1:1", "--ca-file", str(tmp_path / "ca.pem")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "is not mqtts://" in proc.stderr
    for argv, needle in ((["--broker", "mqtts://h:8883"], "without TLS"),
                         (["--broker-tls-port", "8883"], "go together"),
                         (["--broker", "mqtt://h:1", "--secure"], "--secure configures the private broker")):
        with pytest.raises(SystemExit) as exc:
            parse_config(["--data", str(tmp_path), *argv])
        assert exc.value.code == 2 and needle in capsys.readouterr().err, needle
