"""The databases a benchmark runs against: a fresh SQLite file or a fresh PostgreSQL database."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import sqlalchemy as sa

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def targets(choice: str) -> list[str]:
    return ["sqlite", "postgresql"] if choice == "both" else [choice]


@contextlib.contextmanager
def fresh_database(kind: str) -> Iterator[str]:
    """Yield the URL of an empty database of ``kind`` (dropped, or deleted, afterwards);
    any other ``kind`` is taken as a database URL and used as it is."""
    if kind == "sqlite":
        tmp = tempfile.mkdtemp(prefix="edgectl-bench-")
        try:
            yield f"sqlite:///{tmp}/bench.db"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if kind != "postgresql":
        yield kind
        return
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"edgectl_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()
