"""HTTP API tokens: every request needs ``Authorization: Bearer TOKEN`` (GETs too unless
``--public-read``); the server creates its token at first start (0600); ``edgectl`` finds it in
``--token``, ``EDGECTL_TOKEN`` or its config file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sdk.cli import app as cli
from sdk.client import ServerClient, ServerError
from sdk.localfleet import LocalFleet
from server.api import BearerAuth, create_app
from server.config import Config
from server.main import StartupError, api_token, parse_config
from server.service import Service
from server.store import Store

TOKEN = "t0ken-for-the-tests-0123456789"
runner = CliRunner()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    config = Config(data_dir=tmp_path, db_url=f"sqlite:///{tmp_path / 'e.db'}")
    store = Store(config.db_url)
    yield Service(config, store)
    store.close()


def _client(service: Service, public_read: bool = False) -> TestClient:
    return TestClient(create_app(service, tokens=[TOKEN], public_read=public_read))


def test_every_request_needs_the_token(service: Service) -> None:
    c = _client(service)
    good = {"authorization": f"Bearer {TOKEN}"}
    for method, path, kw in (("GET", "/v1/info", {}), ("GET", "/v1/devices", {}), ("GET", "/metrics", {}),
                             ("POST", "/v1/artifacts", {"content": b"x"}),
                             ("POST", "/v1/deployments", {"json": {"artifact": "a", "selector": "all"}}),
                             ("POST", "/v1/feedback", {"json": {"labels": [{"request_id": "r", "label": 1}]}}),
                             ("POST", "/v1/devices/pi-1/enroll", {}),
                             ("DELETE", "/v1/devices/pi-1/credentials", {})):
        r = c.request(method, path, **kw)
        assert r.status_code == 401 and "needs an API token" in r.json()["detail"], (method, path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        for bad in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}", TOKEN, "Bearer é"):
            r = c.request(method, path, headers={"authorization": bad.encode()}, **kw)
            assert r.status_code == 401, (method, path, bad)
        r = c.request(method, path, headers=good, **kw)
        assert r.status_code not in (401, 403), (method, path, r.text)
    assert c.get("/v1/info", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
    assert c.get("/v1/info", headers=good).json()["version"]


def test_public_read_opens_gets_only(service: Service) -> None:
    c = _client(service, public_read=True)
    assert c.get("/v1/info").status_code == 200
    assert c.get("/v1/fleet/health").status_code == 200
    assert c.head("/v1/devices").status_code in (200, 405)
    assert c.post("/v1/feedback", json={"labels": [{"request_id": "r", "label": 1}]}).status_code == 401
    assert c.post("/v1/devices/pi-1/enroll").status_code == 401
    r = c.post("/v1/feedback", json={"labels": [{"request_id": "r", "label": 1}]},
               headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


def test_middleware_refuses_empty_tokens(service: Service) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        BearerAuth(create_app(service), tokens=[""])


def test_token_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    config = parse_config(["--data", str(tmp_path / "d")])
    (tmp_path / "d").mkdir()
    token = api_token(config)
    path = tmp_path / "d" / "api-token"
    assert path.stat().st_mode & 0o777 == 0o600 and len(token) >= 40
    assert api_token(config) == token  # read back, not replaced
    given = tmp_path / "given"
    given.write_text("short\n")
    with pytest.raises(StartupError, match="at least 16"):
        api_token(parse_config(["--data", str(tmp_path / "d"), "--token-file", str(given)]))
    with pytest.raises(StartupError, match="does not exist"):
        api_token(parse_config(["--data", str(tmp_path / "d"), "--token-file", str(tmp_path / "nope")]))


@pytest.fixture(scope="module")
def fleet(mosquitto: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path_factory.mktemp("token-fleet")) as f:
        f.start_server(broker=mosquitto.url)
        yield f


def test_cli_finds_the_token_in_flag_env_or_config_file(fleet: LocalFleet, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert fleet.token == (fleet.workdir / "server" / "api-token").read_text().strip()
    monkeypatch.delenv("EDGECTL_TOKEN", raising=False)
    monkeypatch.setenv("EDGECTL_CONFIG", str(tmp_path / "none.toml"))
    res = runner.invoke(cli, ["devices", "list", "--server", fleet.url])
    assert res.exit_code == 1 and "(401)" in res.output and "EDGECTL_TOKEN" in res.output
    assert len(res.output.strip().splitlines()) <= 3  # one sentence, wrapped at most
    res = runner.invoke(cli, ["devices", "list", "--server", fleet.url, "--token", "wrong-token-0123456789"])
    assert res.exit_code == 1 and "not valid" in res.output
    res = runner.invoke(cli, ["devices", "list", "--server", fleet.url, "--token", fleet.token, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    monkeypatch.setenv("EDGECTL_TOKEN", fleet.token)
    assert runner.invoke(cli, ["devices", "list", "--server", fleet.url]).exit_code == 0
    monkeypatch.delenv("EDGECTL_TOKEN")
    conf = tmp_path / "config.toml"
    conf.write_text(f'server = "{fleet.url}"\ntoken_file = "{fleet.workdir / "server" / "api-token"}"\n')
    monkeypatch.setenv("EDGECTL_CONFIG", str(conf))
    res = runner.invoke(cli, ["fleet", "health", "--json"])  # server and token from the file
    assert res.exit_code == 0, res.output
    conf.write_text('tokn = "x"\n')
    res = runner.invoke(cli, ["devices", "list"])
    assert res.exit_code == 1 and "'tokn' is not one of" in res.output
    with pytest.raises(ServerError, match="401"):
        monkeypatch.setenv("EDGECTL_CONFIG", str(tmp_path / "none.toml"))
        ServerClient(fleet.url).devices()
