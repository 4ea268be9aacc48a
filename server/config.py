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
    log_level: str = "INFO"
    #: Raw per-interval aggregates (and predictions, feedback) are kept this long ...
    retention_raw_s: float = 7 * 86400.0
    #: ... hourly rollups, events and closed sessions this long.
    retention_rollup_s: float = 400 * 86400.0

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def artifact_path(self, sha256: str) -> Path:
        return self.artifacts_dir / sha256[:2] / f"{sha256}.bundle"
