"""The HTTP API fuzzed in process (ASGI) by schemathesis from its own OpenAPI schema, with the
API token: no input gives a 5xx, every refusal is JSON with a ``detail`` sentence. The bearer
check itself is fuzzed with arbitrary Authorization headers."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdk.protocol import messages, topics
from server.api import create_app
from server.config import Config
from server.service import Service
from server.store import Store
from tests.test_server_service import make_bundle

TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _service() -> Service:
    """A service with a little state (a device, an artifact, a deployment), so that the fuzzed
    requests reach past the "unknown id" answers."""
    work = Path(tempfile.mkdtemp(prefix="edgectl-api-fuzz-"))
    atexit.register(shutil.rmtree, work, True)
    config = Config(data_dir=work, db_url=f"sqlite:///{work / 'api.db'}")
    svc = Service(config, Store(config.db_url))
    svc.handle(topics.status("pi-1"), messages.Status(state="online", labels={"group": "lab"}).encode())
    art, _ = svc.add_artifact(make_bundle(work))
    svc.create_deployment(art["sha256"], "device:pi-1")
    return svc


SERVICE = _service()
APP = create_app(SERVICE, tokens=[TOKEN])
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, headers=AUTH)


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case: Any) -> None:
    response = case.call(headers=AUTH)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        detail = response.json().get("detail")
        assert isinstance(detail, str) and detail, response.text[:500]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(header=st.one_of(st.binary(max_size=80), st.text(max_size=60).map(lambda t: f"Bearer {t}".encode()),
                        st.sampled_from([f"Bearer {TOKEN}".encode(), f"bearer  {TOKEN}".encode(),
                                         f"Bearer {TOKEN}\x00".encode(), TOKEN.encode()])),
       method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]))
def test_only_the_token_opens_the_api(header: bytes, method: str) -> None:
    with TestClient(APP) as client:
        r = client.request(method, "/v1/info", headers=[(b"authorization", header)])
    stripped = header.partition(b" ")
    valid = stripped[0].lower() == b"bearer" and stripped[2].strip() == TOKEN.encode()
    assert r.status_code < 500
    assert (r.status_code != 401) == valid, (header, r.status_code)
