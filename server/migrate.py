"""Alembic migrations, run from code: ``edgectl-server db upgrade`` and the embedded default.

The migration scripts ship inside the package (``server/migrations``). A database created
before migrations existed (tables made by ``create_all``, no ``alembic_version``) is stamped
with the first revision, which is exactly that schema, and then upgraded like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Alembic logs every plugin (at import) and step at INFO; the server logs what matters itself.
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import inspect  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from sdk.protocol.errors import EdgeError  # noqa: E402

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LEGACY_REVISION = "0001"


class SchemaError(EdgeError):
    """The database schema is older (or newer) than this server."""


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()  # type: ignore[return-value]


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the schema to ``revision``; returns (revision before, revision after)."""
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        before = MigrationContext.configure(conn).get_current_revision()
        insp = inspect(conn)
        if before is None and insp.has_table("devices"):
            command.stamp(cfg, LEGACY_REVISION)
            before = LEGACY_REVISION
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after or ""


def check(engine: Engine) -> None:
    """Raise SchemaError unless the database is at this server's head revision."""
    have, want = current(engine), head()
    if have != want:
        url = engine.url.render_as_string(hide_password=True)
        raise SchemaError(f"database {url} is at schema revision {have or 'none'}, this server needs "
                          f"{want}: run `edgectl-server db upgrade --db {url}`")
