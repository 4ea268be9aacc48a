"""Shared fixtures: a private Mosquitto per test session, free ports, PostgreSQL databases."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from server.broker import render_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PG_ADMIN_URL = os.environ.get("EDGECTL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


T = TypeVar("T")


def wait_for(fn: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy (returned); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout}s (last value {value!r})")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
    if not found:
        pytest.fail("mosquitto is not installed; `make test` installs it (apt-get install mosquitto)")
    return found


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A private Mosquitto on a free loopback port (never 1883), stopped by its PID.

    One per test module: retained messages of one module's devices never leak into another's.
    """
    workdir = tmp_path_factory.mktemp("mosquitto")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(render_config(port, workdir, persistence=False))
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield Broker("127.0.0.1", port, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"edgectl_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on both the embedded SQLite and a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgectl.db'}"
    return request.getfixturevalue("pg_url")


@dataclass(frozen=True)
class Digits:
    """A small Keras CNN trained on scikit-learn's digits, its data, and its bundle."""

    model: Path
    eval: Path
    calibration: Path
    bundle: Path


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    from sdk.compress import compress
    from sdk.demo import train_digits

    work = tmp_path_factory.mktemp("digits")
    paths = train_digits(work, epochs=8)
    bundle = work / "digits.bundle"
    compress(paths["model"], bundle, quantize="dynamic", eval_data=paths["eval"], name="digits", version="1.0.0")
    return Digits(paths["model"], paths["eval"], paths["calibration"], bundle)
