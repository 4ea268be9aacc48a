"""The server's configuration, filled in by the CLI (``server.main``) or by tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_HTTP = "127.0.0.1:8765"
DEFAULT_CHUNK_SIZE = 65536
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 8 * 1024 * 1024
#: Largest bundle accepted by POST /v1/artifacts.
MAX_ARTIFACT_BYTES = 512 * 1024 * 1024


@dataclass
class Config:
    data_dir: Path
    db_url: str
    http_host: str = "127.0.0.1"
    http_port: int = 8765
    #: "local" (start a private Mosquitto) or "mqtt://HOST:PORT".
    broker: str = "local"
    broker_port: int = 0
    heartbeat_timeout: float = 15.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: When several devices download one artifact at once, its chunks are broadcast on its
    #: artifact topic, and a chunk broadcast less than this many seconds ago is not sent again
    #: (per-device repair after that); 0 turns fan-out off (every device gets its own copy).
    fanout_window_s: float = 5.0
    log_level: str = "INFO"
    #: Raw per-interval aggregates (and predictions, feedback) are kept this long ...
    retention_raw_s: float = 7 * 86400.0
    #: ... hourly rollups, events and closed sessions this long.
    retention_rollup_s: float = 400 * 86400.0
    #: How often the rollout loop advances gated rollouts.
    rollout_interval_s: float = 1.0
    #: The HTTP API's bearer token file (default ``DATA/api-token``, created at first start).
    token_file: Path | None = None
    #: GET and HEAD without a token (health, lists, metrics); changes always need one.
    public_read: bool = False
    #: ``--broker local`` only: per-device passwords and ACL, anonymous clients refused.
    secure_broker: bool = False
    #: Address the private broker listens on (devices on other hosts need a LAN address).
    broker_bind: str = "127.0.0.1"
    #: ``(port, certfile, keyfile)``: the private broker also listens for devices over TLS.
    broker_tls: tuple[int, Path, Path] | None = None
    #: The server's own broker account on an external broker (``--broker mqtt://...``).
    broker_username: str | None = None
    broker_password_file: Path | None = None
    #: Worker processes that take device telemetry (shared subscription); 0 = the server process.
    ingest_workers: int = 0

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def api_token_path(self) -> Path:
        return self.token_file or self.data_dir / "api-token"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def artifact_path(self, sha256: str) -> Path:
        return self.artifacts_dir / sha256[:2] / f"{sha256}.bundle"
