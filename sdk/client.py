"""HTTP client for edgectl-server (the workstation's side of the API).

Where the server and its API token come from, first match wins: the argument (``--server``,
``--token``), the environment (``EDGECTL_SERVER``, ``EDGECTL_TOKEN``), the config file
(``$EDGECTL_CONFIG``, default ``~/.config/edgectl/config.toml``)::

    server = "http://fleet-host:8765"
    token_file = "~/.config/edgectl/token"   # or: token = "..."

The server writes its admin token to ``DATA/api-token`` (mode 0600) at first start.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import httpx

from .protocol import DeployError, EdgeError

DEFAULT_SERVER = "http://127.0.0.1:8765"
CONFIG_KEYS = ("server", "token", "token_file")


def config_path() -> Path:
    return Path(os.environ.get("EDGECTL_CONFIG") or "~/.config/edgectl/config.toml").expanduser()


def load_client_config() -> dict[str, str]:
    """The workstation's config file (missing file: no settings); bad content is an error naming it."""
    path = config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EdgeError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    for key, value in data.items():
        if key not in CONFIG_KEYS or not isinstance(value, str):
            raise EdgeError(f"config file {path}: {key!r} is not one of {', '.join(CONFIG_KEYS)} "
                            "(each a string)")
    return data


def default_server() -> str:
    return os.environ.get("EDGECTL_SERVER") or load_client_config().get("server") or DEFAULT_SERVER


def default_token() -> str | None:
    """The API token from EDGECTL_TOKEN or the config file (``token`` or ``token_file``)."""
    token = os.environ.get("EDGECTL_TOKEN")
    if token:
        return token.strip()
    conf = load_client_config()
    if conf.get("token"):
        return conf["token"].strip()
    if conf.get("token_file"):
        path = Path(conf["token_file"]).expanduser()
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise EdgeError(f"cannot read token_file {path} (from {config_path()}): "
                            f"{exc.strerror or exc}") from None
    return None


class ServerError(EdgeError):
    """The server refused a request or could not be reached."""


class ServerClient:
    def __init__(self, base_url: str | None = None, timeout: float = 30.0, *, token: str | None = None):
        self.base_url = (base_url or default_server()).rstrip("/")
        token = token or default_token()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach edgectl-server at {self.base_url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            if not isinstance(detail, str):
                detail = str(detail)
            if resp.status_code == 401:
                detail += (" (give --token, set EDGECTL_TOKEN, or token_file in the config file; the "
                           "server keeps its admin token in DATA/api-token)")
            raise ServerError(f"server refused {method} {path} ({resp.status_code}): {detail[:500]}")
        return resp.json()

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/v1/info")

    def upload(self, bundle: str | Path) -> dict[str, Any]:
        try:
            data = Path(bundle).read_bytes()
        except OSError as exc:
            raise DeployError(f"cannot read bundle {bundle}: {exc.strerror or exc}") from None
        return self._call("POST", "/v1/artifacts", content=data,
                          headers={"content-type": "application/octet-stream"})

    def deploy(self, artifact: str, selector: str, *, service: str | None = None, replicas: int | None = None,
               stage_map: dict[str, int] | None = None, strategy: dict[str, Any] | None = None,
               gates: dict[str, Any] | None = None) -> dict[str, Any]:
        """Deploy an uploaded artifact; ``service`` / ``replicas`` / ``stage_map`` (or a pipeline
        bundle) make it a service on shared topics, each device with its stage. ``strategy`` /
        ``gates`` make it a gated rollout (canary, waves, soak, health gates)."""
        body: dict[str, Any] = {"artifact": artifact, "selector": selector}
        for key, value in (("service", service), ("replicas", replicas), ("stage_map", stage_map),
                           ("strategy", strategy), ("gates", gates)):
            if value is not None:
                body[key] = value
        return self._call("POST", "/v1/deployments", json=body)

    def rollouts(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/rollouts")

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """One rollout by rollout or deployment id: waves, devices, gates, history, summary."""
        return self._call("GET", f"/v1/rollouts/{rollout_id}")

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """pause, resume, abort or rollback; answers the rollout afterwards."""
        return self._call("POST", f"/v1/rollouts/{rollout_id}/{action}")

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/deployments/{deployment_id}")

    def devices(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/devices")

    def health(self, window_s: float, *, group: str | None = None, model: str | None = None,
               by: str = "device") -> dict[str, Any]:
        params: dict[str, Any] = {"window": window_s, "by": by}
        if group is not None:
            params["group"] = group
        if model is not None:
            params["model"] = model
        return self._call("GET", "/v1/fleet/health", params=params)

    def device(self, device_id: str, window_s: float = 86400.0) -> dict[str, Any]:
        return self._call("GET", f"/v1/devices/{device_id}", params={"window": window_s})

    def enroll(self, device_id: str) -> dict[str, Any]:
        """New broker credentials for a device (the password is returned once)."""
        return self._call("POST", f"/v1/devices/{device_id}/enroll")

    def revoke(self, device_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/devices/{device_id}/credentials")

    def feedback(self, labels: list[tuple[str, int]]) -> dict[str, Any]:
        return self._call("POST", "/v1/feedback",
                          json={"labels": [{"request_id": r, "label": lab} for r, lab in labels]})
