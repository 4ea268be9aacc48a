"""The HTTP API for workstations and operators (FastAPI). Handlers only translate: parse the
request, call one ``Service`` method, map the error family to a status code."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdk.protocol.errors import BundleError, DeployError, EdgeError

from . import __version__
from .config import MAX_ARTIFACT_BYTES
from .rollout import Gates, RolloutError, Strategy
from .security import EnrollError, NoCredentials
from .service import Service
from .store import NotFound

log = logging.getLogger("edgectl.server.api")
#: Methods that never change anything: allowed without a token under ``--public-read``.
READ_METHODS = frozenset({"GET", "HEAD"})


class StrategyBody(BaseModel):
    """Canary then waves: sizes >= 1 are device counts, sizes in (0, 1) fractions of the targets;
    ``canary=0`` and no waves is all at once (still soaked and judged by the gates)."""

    canary: float = Field(1, ge=0, le=1_000_000)
    waves: list[float] = Field(default_factory=lambda: [0.5], max_length=50)
    soak_s: float = Field(60.0, ge=0, le=7 * 86400)
    install_timeout_s: float = Field(300.0, gt=0, le=7 * 86400)
    rollback_scope: Literal["all", "wave"] = "all"
    #: Bundles with variants: a device class (profile) whose p95 exceeds this SLO over a soak ...
    latency_slo_ms: float | None = Field(None, gt=0, le=3_600_000)
    #: ... moves to the next smaller variant (opt-in), recorded with the reason.
    downgrade: bool = False


class GatesBody(BaseModel):
    """Health gates (``server.rollout.Gates``); null disables a gate, absent keeps its default."""

    max_install_failure_ratio: float = Field(0.0, ge=0, le=1)
    max_error_rate: float | None = Field(0.05, ge=0, le=1)
    max_error_rate_increase: float | None = Field(0.02, ge=0, le=1)
    max_p95_regression: float | None = Field(0.20, ge=0, le=1000)
    min_p95_increase_ms: float = Field(0.5, ge=0, le=3_600_000)
    p95_confidence: float | None = Field(0.95, ge=0.5, lt=1)
    min_availability: float | None = Field(0.90, ge=0, le=1)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(0.02, ge=0, le=1)
    min_inferences: int = Field(20, ge=0, le=10**9)


class DeploymentRequest(BaseModel):
    artifact: str = Field(min_length=1, max_length=128)
    selector: str = Field(min_length=1, max_length=4096)
    #: With a strategy the deployment is a gated rollout (``edgectl rollout ...``).
    strategy: StrategyBody | None = None
    gates: GatesBody | None = None
    #: A service on shared topics (``server.placement``): replica pool, pipeline, or both.
    service: str | None = Field(None, min_length=1, max_length=64)
    replicas: int | None = Field(None, ge=1, le=1000)
    #: Pins: device id -> stage (1-based).
    stage_map: dict[str, int] | None = None


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


class BearerAuth:
    """ASGI middleware: every request needs ``Authorization: Bearer <token>`` (GET and HEAD
    too, unless ``public_read``). It answers 401 before the route runs or the body is read, so
    an unauthenticated client cannot make the server read a large upload. Tokens are compared
    in constant time (``hmac.compare_digest``), each one, without stopping at a match.
    """

    def __init__(self, app: Any, tokens: Sequence[str], public_read: bool = False):
        if not tokens or not all(tokens):
            raise ValueError("BearerAuth needs at least one non-empty token")
        self.app = app
        self.tokens = [t.encode() for t in tokens]
        self.public_read = public_read

    def _valid(self, presented: bytes) -> bool:
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(presented, token)
        return ok

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (self.public_read and scope["method"] in READ_METHODS):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        scheme, _, presented = (header or b"").partition(b" ")
        if header is None or scheme.lower() != b"bearer" or not presented.strip():
            why = "this request needs an API token: send 'Authorization: Bearer TOKEN'"
        elif not self._valid(presented.strip()):
            why = "the API token is not valid"
        else:
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        log.warning("HTTP %s %r from %s refused: %s", scope["method"], scope.get("path", "")[:200], client[0], why)
        response = JSONResponse(status_code=401, content={"detail": why},
                                headers={"WWW-Authenticate": 'Bearer realm="edgectl"'})
        await response(scope, receive, send)


def _error_handler(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return _error(status, str(exc))
    return handler


def create_app(service: Service, *, tokens: Sequence[str] | None = None, public_read: bool = False) -> FastAPI:
    """The API; with ``tokens`` every request needs one of them (``public_read``: not GETs).

    Without ``tokens`` there is no authentication: for in-process tests only, ``edgectl-server``
    always passes its token.
    """
    app = FastAPI(title="edgectl-server", version=__version__, docs_url=None, redoc_url=None)
    if tokens is not None:
        app.add_middleware(BearerAuth, tokens=list(tokens), public_read=public_read)

    # Our errors as HTTP statuses; Starlette picks the handler of the nearest class in the MRO.
    for exc_type, status in ((NotFound, 404), (NoCredentials, 404), (BundleError, 400), (DeployError, 400),
                             (EnrollError, 400), (RolloutError, 409), (EdgeError, 400)):
        app.add_exception_handler(exc_type, _error_handler(status))

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
        if body.strategy is None and body.gates is None:
            return service.create_deployment(body.artifact, body.selector, service=body.service,
                                             replicas=body.replicas, stage_map=body.stage_map)
        s = body.strategy or StrategyBody()
        try:
            strategy = Strategy(canary=s.canary, waves=tuple(s.waves), soak_s=s.soak_s,
                                install_timeout_s=s.install_timeout_s, rollback_scope=s.rollback_scope,
                                latency_slo_ms=s.latency_slo_ms, downgrade=s.downgrade)
        except RolloutError as exc:
            raise DeployError(f"strategy: {exc}") from None
        gates = Gates(**(body.gates or GatesBody()).model_dump())
        return service.create_deployment(body.artifact, body.selector, strategy, gates, service=body.service,
                                         replicas=body.replicas, stage_map=body.stage_map)

    @app.get("/v1/rollouts")
    def list_rollouts() -> list[dict[str, Any]]:
        """Every rollout, newest first, with its phase and progress."""
        return service.rollouts.list()

    @app.get("/v1/rollouts/{rollout_id}")
    def get_rollout(rollout_id: str) -> dict[str, Any]:
        """One rollout (by rollout or deployment id): per wave and per device state, gate results,
        history, and a summary in sentences (why it rolled back, which devices returned)."""
        return service.rollouts.show(rollout_id)

    @app.post("/v1/rollouts/{rollout_id}/{action}")
    def rollout_action(rollout_id: str, action: Literal["pause", "resume", "abort", "rollback"]) -> dict[str, Any]:
        """Operator control; 409 when the rollout's phase does not allow it."""
        service.rollouts.advance(rollout_id, cmd=action)
        return service.rollouts.show(rollout_id)

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

    @app.post("/v1/devices/{device_id}/enroll", status_code=201)
    def enroll_device(device_id: str) -> dict[str, Any]:
        """Create (or rotate) the device's broker credentials; the password is shown only here."""
        return service.enroll(device_id)

    @app.delete("/v1/devices/{device_id}/credentials")
    def revoke_device(device_id: str) -> dict[str, Any]:
        """Remove the device's broker credentials; the broker disconnects it."""
        return service.revoke(device_id)

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
