"""The HTTP API for workstations and operators (FastAPI). Handlers only translate: parse the
request, call one ``Service`` method, map the error family to a status code."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdk.protocol.errors import BundleError, DeployError

from . import __version__
from .config import MAX_ARTIFACT_BYTES
from .service import Service
from .store import NotFound


class DeploymentRequest(BaseModel):
    artifact: str = Field(min_length=1, max_length=128)
    selector: str = Field(min_length=1, max_length=4096)


class Label(BaseModel):
    request_id: str = Field(min_length=1, max_length=64)
    label: int = Field(ge=0, lt=2**31)


class FeedbackRequest(BaseModel):
    labels: list[Label] = Field(min_length=1, max_length=10000)


class TooLarge(Exception):
    pass


def _num(value: float) -> float | int:
    return int(value) if value == int(value) else value


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _validation_sentence(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="edgectl-server", version=__version__, docs_url=None, redoc_url=None)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(BundleError)
    async def _bad_bundle(_: Request, exc: BundleError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(DeployError)
    async def _bad_deploy(_: Request, exc: DeployError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(TooLarge)
    async def _too_large(_: Request, exc: TooLarge) -> JSONResponse:
        return _error(413, f"bundle is larger than the limit of {MAX_ARTIFACT_BYTES} bytes")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_sentence(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint"
        return _error(exc.status_code, detail)

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        return service.info()

    @app.post("/v1/artifacts", status_code=201)
    async def upload_artifact(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_ARTIFACT_BYTES:
            raise TooLarge
        buf = bytearray()
        async for block in request.stream():
            buf += block
            if len(buf) > MAX_ARTIFACT_BYTES:
                raise TooLarge
        if not buf:
            raise BundleError("request body is empty; send the bundle bytes (application/octet-stream)")
        art, created = await run_in_threadpool(service.add_artifact, bytes(buf))
        return JSONResponse(status_code=201 if created else 200, content=art)

    @app.get("/v1/artifacts")
    def list_artifacts() -> list[dict[str, Any]]:
        return service.artifacts()

    @app.post("/v1/deployments", status_code=201)
    def create_deployment(body: DeploymentRequest) -> dict[str, Any]:
        return service.create_deployment(body.artifact, body.selector)

    @app.get("/v1/deployments")
    def list_deployments() -> list[dict[str, Any]]:
        return service.deployments()

    @app.get("/v1/deployments/{deployment_id}")
    def get_deployment(deployment_id: str) -> dict[str, Any]:
        return service.deployment(deployment_id)

    @app.get("/v1/devices")
    def list_devices() -> list[dict[str, Any]]:
        return service.devices()

    @app.get("/v1/devices/{device_id}")
    def get_device(device_id: str, window: float = Query(86400.0, gt=0, le=10 * 365 * 86400)) -> dict[str, Any]:
        """The device, its latest health report, its health over the window, hourly history,
        recent sessions, deployments and events."""
        return service.device_detail(device_id, _num(window))

    @app.get("/v1/fleet/health")
    def fleet_health(window: float = Query(3600.0, gt=0, le=10 * 365 * 86400),
                     group: str | None = Query(None, max_length=64),
                     model: str | None = Query(None, max_length=256),
                     by: Literal["device", "group", "model"] = "device") -> dict[str, Any]:
        return service.fleet_health(_num(window), group=group, model=model, by=by)

    @app.post("/v1/feedback")
    def feedback(body: FeedbackRequest) -> dict[str, int]:
        """Ground-truth labels for request ids (hex of the inference request's CorrelationData)."""
        return service.add_feedback([(x.request_id, x.label) for x in body.labels])

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        from .metrics import WINDOW_S, render

        text = render(service.info(), service.fleet_health(WINDOW_S))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
