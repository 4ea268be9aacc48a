"""Alembic migrations on SQLite and PostgreSQL: a database made before migrations existed is
stamped and upgraded with its data; a server that must not upgrade refuses an old schema."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from sdk.protocol import histogram, messages
from server import migrate
from server.main import main as server_main
from server.store import Store, make_engine

T = datetime(2030, 1, 1, tzinfo=UTC)


def test_a_pre_migration_database_is_upgraded_with_its_data(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, "0001")  # the create_all schema of before ...
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE alembic_version"))  # ... made without Alembic
            conn.execute(sa.text("INSERT INTO devices (id, labels, agent_version, runtime, profile, first_seen, "
                                 "last_seen) VALUES ('old-1', '{\"group\": \"g\"}', '0.1', 'litert', '', "
                                 "'2029-12-31 23:00:00', '2029-12-31 23:00:00')"))
        with pytest.raises(migrate.SchemaError, match="db upgrade"):
            Store(db_url, upgrade=False)
        assert server_main(["db", "upgrade", "--db", db_url]) == 0
        assert "upgraded from 0001 to " + migrate.head() in capsys.readouterr().out
        assert migrate.current(engine) == migrate.head()
    finally:
        engine.dispose()
    store = Store(db_url, upgrade=False, clock=lambda: T)
    try:
        assert store.device("old-1")["labels"] == {"group": "g"}
        hist = histogram.empty()
        hist[10] = 2
        msg = messages.Telemetry(seq=1, interval_s=60, count=2, errors=0, latency_hist=hist, latency_sum_ms=0.2)
        assert store.add_telemetry("old-1", msg, T) is True
        assert store.fleet_health(86400 * 2, T, group="g")["devices"][0]["inferences"] == 2
    finally:
        store.close()
    assert server_main(["db", "current", "--db", db_url]) == 0
    assert f"revision {migrate.head()}" in capsys.readouterr().out


def test_db_upgrade_of_an_unreachable_database_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert server_main(["db", "upgrade", "--db", "postgresql+psycopg://nobody@127.0.0.1:9/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgectl-server: error: cannot upgrade database")


def test_migrations_ship_inside_the_package() -> None:
    files = {p.name for p in migrate.MIGRATIONS.rglob("*.py")}
    assert {"env.py", "0001_initial.py", "0002_health.py", "0003_views.py"} <= files
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "migrations/*.py" in data["tool"]["setuptools"]["package-data"]["server"]
    assert any(d.startswith("alembic") for d in data["project"]["optional-dependencies"]["server"])


def test_the_migrated_schema_matches_the_models(db_url: str) -> None:
    """Every model change ships with its migration: Alembic's autogenerate finds nothing to add."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from server.store import Base

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        migrate.upgrade(engine, "head")
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
