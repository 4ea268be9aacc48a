"""Per-device broker credentials: ``edgectl-server --broker local --secure`` runs Mosquitto with
the password file and ACL it keeps; ``edgectl devices enroll`` adds a device and reloads the
broker (SIGHUP) so the device connects at once. Checked with a real agent, real peers and the
operator account: anonymous clients are refused, a device reaches only its own topics (plus the
shared service topics and inference answers), and a revoked device is disconnected."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdk.cli import app as cli
from sdk.infer import InferenceClient
from sdk.localfleet import LocalFleet, wait_for
from sdk.protocol import EdgeError, messages, topics
from sdk.protocol.frames import tensor_to_npy
from server.security import OPERATOR_USER, SERVER_USER, BrokerAccounts, parse_passwd
from tests.test_broker_security import Peer

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path_factory.mktemp("secure-fleet")) as f:
        f.start_server(broker="local", extra=["--secure", "--heartbeat-timeout", "30"])
        yield f


def _port(fleet: LocalFleet) -> int:
    return int(fleet.broker.rsplit(":", 1)[1])


def _enroll(fleet: LocalFleet, device: str, out: Path) -> str:
    res = runner.invoke(cli, ["devices", "enroll", device, "--out", str(out), "--server", fleet.url, "--json"])
    assert res.exit_code == 0, res.output
    creds = json.loads(res.stdout)
    assert creds["applied"] is True and creds["username"] == device
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.read_text().strip() == creds["password"]
    return creds["password"]


def _online(fleet: LocalFleet, device: str) -> bool:
    with fleet.client() as c:
        return any(d["id"] == device and d["online"] for d in c.devices())


def test_enrolled_devices_reach_only_their_own_topics(fleet: LocalFleet, tmp_path: Path) -> None:
    broker_dir = fleet.workdir / "server" / "broker"
    conf = (broker_dir / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "acl_file" in conf
    assert {SERVER_USER, OPERATOR_USER} <= set(parse_passwd((broker_dir / "passwd").read_text()))
    for name in ("passwd", "acl", "server.password", "operator.password"):
        assert (broker_dir / name).stat().st_mode & 0o777 == 0o600, name
    port = _port(fleet)

    anon = Peer(port, None, None, None)
    assert anon.result not in (None, "ok")
    anon.close()

    # Enroll A and start a real agent with its credentials: it connects at once (no restart).
    pw_a = _enroll(fleet, "dev-a", tmp_path / "dev-a.password")
    pw_b = _enroll(fleet, "dev-b", tmp_path / "dev-b.password")
    (tmp_path / "agent.toml").write_text(
        f'username = "dev-a"\npassword_file = "{tmp_path / "dev-a.password"}"\n')
    fleet.start_agent("dev-a", extra=["--config", str(tmp_path / "agent.toml")])
    wait_for("dev-a online", lambda: _online(fleet, "dev-a"), timeout=20)

    wrong = Peer(port, None, "dev-a", pw_b)
    assert wrong.result not in (None, "ok")
    wrong.close()
    b = Peer(port, None, "dev-b", pw_b)
    operator_pw = (broker_dir / "operator.password").read_text().strip()
    op = Peer(port, None, OPERATOR_USER, operator_pw)
    try:
        assert b.result == "ok" and op.result == "ok"
        b.sub("#", topics.service_group("svc", 1))
        # B forges A's offline status and A's telemetry: the broker drops both.
        b.c.publish(topics.status("dev-a"), messages.Status(state="offline").encode(), qos=1,
                    retain=True).wait_for_publish(5)
        b.c.publish(topics.heartbeat("dev-a"), messages.Heartbeat(uptime_s=1.0).encode(), qos=1).wait_for_publish(5)
        # The operator asks A for an inference (A answers: no model yet) and feeds the service.
        with InferenceClient(fleet.broker, username=OPERATOR_USER, password=operator_pw) as ic:
            answer = ic.infer("dev-a", np.zeros((1, 4), np.float32), timeout=10)
        assert not answer.ok and "no model is active" in answer.error
        op.c.publish(topics.service_infer("svc", 1), tensor_to_npy(np.ones((1, 2), np.float32)),
                     qos=1).wait_for_publish(5)
        # The operator may not write device state.
        op.c.publish(topics.status("dev-a"), messages.Status(state="offline").encode(), qos=1).wait_for_publish(5)
        time.sleep(1.0)
        got = {t for t, _ in b.got}
        assert topics.service_infer("svc", 1) in got, got
        assert not any("/dev-a/" in t for t in got), got  # not A's infer request, status or desired
        assert _online(fleet, "dev-a"), "a forged offline status reached the server"
        # B can still do its own job: its status reaches the server.
        b.c.publish(topics.status("dev-b"), messages.Status(state="online").encode(), qos=1).wait_for_publish(5)
        wait_for("dev-b online", lambda: _online(fleet, "dev-b"), timeout=10)

        # Rotate B's password: the old one no longer works, the new one does.
        new_b = _enroll(fleet, "dev-b", tmp_path / "dev-b.rotated")
        assert new_b != pw_b
        old = Peer(port, None, "dev-b", pw_b)
        new = Peer(port, None, "dev-b", new_b)
        assert old.result not in (None, "ok") and new.result == "ok"
        old.close()
        new.close()
    finally:
        b.close()
        op.close()

    res = runner.invoke(cli, ["devices", "revoke", "dev-b", "--server", fleet.url])
    assert res.exit_code == 0 and "revoked dev-b" in res.output
    again = Peer(port, None, "dev-b", new_b)
    assert again.result not in (None, "ok")
    again.close()
    res = runner.invoke(cli, ["devices", "revoke", "dev-b", "--server", fleet.url])
    assert res.exit_code == 1 and "(404)" in res.output and "no broker credentials" in res.output
    assert _online(fleet, "dev-a") and pw_a


def test_enroll_refuses_reserved_and_invalid_ids(fleet: LocalFleet, tmp_path: Path) -> None:
    for bad, why in ((SERVER_USER, "reserved"), ("bad id!", "invalid device id")):
        res = runner.invoke(cli, ["devices", "enroll", bad, "--out", str(tmp_path / "x"), "--server", fleet.url])
        assert res.exit_code == 1 and "(400)" in res.output and why in res.output, res.output
        assert not (tmp_path / "x").exists()
    (tmp_path / "exists").write_text("keep me")
    res = runner.invoke(cli, ["devices", "enroll", "dev-c", "--out", str(tmp_path / "exists"), "--server", fleet.url])
    assert res.exit_code == 1 and "exists" in res.output and (tmp_path / "exists").read_text() == "keep me"


def test_bad_credentials_are_reported_by_the_inference_client(fleet: LocalFleet) -> None:
    with pytest.raises(EdgeError, match="refused the connection"):
        InferenceClient(fleet.broker, username=OPERATOR_USER, password="wrong", connect_timeout=5)


def test_without_a_running_secure_broker_enroll_only_writes_the_files(tmp_path: Path) -> None:
    accounts = BrokerAccounts(tmp_path)
    accounts.ensure()
    password, applied = accounts.enroll("pi-9")
    assert not applied and accounts.devices() == ["pi-9"]
    hashed = parse_passwd((tmp_path / "passwd").read_text())["pi-9"]
    from server.security import check_password

    assert check_password(password, hashed)
    acl = (tmp_path / "acl").read_text()
    assert "pattern write edgectl/v1/devices/%u/telemetry" in acl and f"user {OPERATOR_USER}" in acl
    # The server's password survives a restart; device hashes survive a rewrite.
    server_pw = (tmp_path / "server.password").read_text()
    BrokerAccounts(tmp_path).ensure()
    assert (tmp_path / "server.password").read_text() == server_pw and accounts.devices() == ["pi-9"]
