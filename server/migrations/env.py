"""Alembic environment: always runs on a connection handed over by ``server.migrate``."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `edgectl-server db upgrade` (server.migrate)")
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
