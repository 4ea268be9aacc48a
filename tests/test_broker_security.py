"""Per-device credentials and ACLs on a real Mosquitto (with TLS): a device reaches only its own
topics, anonymous and wrong-password clients are refused."""

from __future__ import annotations

import datetime as dt
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from sdk.protocol import messages, topics
from server.security import (
    SERVER_USER,
    check_password,
    hash_password,
    new_password,
    render_acl,
    render_passwd,
    render_secure_listener,
)
from tests.conftest import free_port, mosquitto_binary, wait_port

USERS = {SERVER_USER: new_password(), "operator-1": new_password(), "dev-a": new_password(), "dev-b": new_password()}


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with cryptography."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgectl test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    d = tmp_path_factory.mktemp("secure-broker")
    tls = make_tls(d)
    (d / "passwd").write_text(render_passwd({u: hash_password(p) for u, p in USERS.items()}))
    (d / "acl").write_text(render_acl(operators=["operator-1"]))
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(render_secure_listener(port, d, tls=tls) + f"log_dest file {d / 'log'}\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, tls[0]
    finally:
        proc.terminate()
        proc.wait(10)


class Peer:
    """A paho client that records what it receives and how its connection went."""

    def __init__(self, port: int, ca: Path | None, user: str | None, password: str | None):
        self.got: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.result: str | None = None
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"{user or 'anon'}-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        if user:
            self.c.username_pw_set(user, password)
        if ca:
            self.c.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        deadline = time.monotonic() + 10
        while self.result is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        self.result = "ok" if not rc.is_failure else str(rc)
        if not rc.is_failure:
            self.connected.set()

    def sub(self, *filters: str) -> None:
        self.c.subscribe([(f, 1) for f in filters])
        time.sleep(0.3)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_password_hashes_round_trip() -> None:
    h = hash_password("s3cret")
    assert h.startswith("$7$101$") and check_password("s3cret", h) and not check_password("nope", h)
    with pytest.raises(Exception, match="invalid broker username"):
        render_passwd({"evil:user": h})


def test_anonymous_and_wrong_passwords_are_refused(secure_broker) -> None:
    port, ca = secure_broker
    anon = Peer(port, ca, None, None)
    wrong = Peer(port, ca, "dev-a", "not-the-password")
    try:
        assert anon.result is not None and anon.result != "ok"
        assert wrong.result is not None and wrong.result != "ok"
    finally:
        anon.close()
        wrong.close()


def test_a_device_reaches_only_its_own_topics(secure_broker) -> None:
    port, ca = secure_broker
    server = Peer(port, ca, SERVER_USER, USERS[SERVER_USER])
    a = Peer(port, ca, "dev-a", USERS["dev-a"])
    try:
        assert server.result == "ok" and a.result == "ok"
        server.sub(topics.device_wildcard("telemetry"))
        a.sub("#", topics.device_wildcard("desired"))
        # the server publishes each device's desired state; A must see only its own
        for dev in ("dev-a", "dev-b"):
            d = messages.Desired("d-1", "a" * 64, 2048, 1024, "m", dev)
            server.c.publish(topics.desired(dev), d.encode(), qos=1, retain=True).wait_for_publish(5)
        # A publishes telemetry as itself, and pretends to be B
        a.c.publish(topics.telemetry("dev-a"), b'{"from": "a"}', qos=1).wait_for_publish(5)
        a.c.publish(topics.telemetry("dev-b"), b'{"forged": "b"}', qos=1).wait_for_publish(5)
        time.sleep(1.0)
        assert [t for t, _ in server.got] == [topics.telemetry("dev-a")]
        assert {t for t, _ in a.got} == {topics.desired("dev-a")}
    finally:
        server.close()
        a.close()


def test_tls_is_required_on_the_secure_listener(secure_broker) -> None:
    port, _ = secure_broker
    plain = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="plain",
                        protocol=mqtt.MQTTv5)
    plain.username_pw_set("dev-a", USERS["dev-a"])
    ok = threading.Event()
    plain.on_connect = lambda c, u, f, rc, p: ok.set() if not rc.is_failure else None
    try:
        plain.connect("127.0.0.1", port)
        plain.loop_start()
        assert not ok.wait(2.0)
    except (OSError, ConnectionError):
        pass  # refused at the socket: also fine
    finally:
        plain.loop_stop()
