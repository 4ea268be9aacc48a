"""HTTP client for edgectl-server (the workstation's side of the API)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from .protocol import DeployError, EdgeError

DEFAULT_SERVER = "http://127.0.0.1:8765"


def default_server() -> str:
    return os.environ.get("EDGECTL_SERVER", DEFAULT_SERVER)


class ServerError(EdgeError):
    """The server refused a request or could not be reached."""


class ServerClient:
    def __init__(self, base_url: str | None = None, timeout: float = 30.0):
        self.base_url = (base_url or default_server()).rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

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

    def deploy(self, artifact: str, selector: str) -> dict[str, Any]:
        return self._call("POST", "/v1/deployments", json={"artifact": artifact, "selector": selector})

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

    def feedback(self, labels: list[tuple[str, int]]) -> dict[str, Any]:
        return self._call("POST", "/v1/feedback",
                          json={"labels": [{"request_id": r, "label": lab} for r, lab in labels]})
