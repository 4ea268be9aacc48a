"""The schema as it was before migrations (created by ``create_all``): devices, artifacts,
deployments and their targets, connection sessions, raw telemetry.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("version", sa.String(256), nullable=False),
        sa.Column("quantization", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("artifact", sa.String(64), sa.ForeignKey("artifacts.sha256"), nullable=False),
        sa.Column("selector", sa.Text(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_deployments_created_at", "deployments", ["created_at"])
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("agent_version", sa.String(256), nullable=False),
        sa.Column("runtime", sa.String(256), nullable=False),
        sa.Column("profile", sa.String(256), nullable=False),
        sa.Column("model_artifact", sa.String(64)),
        sa.Column("model_name", sa.String(256)),
        sa.Column("model_version", sa.String(256)),
        sa.Column("deployment_id", sa.String(64), sa.ForeignKey("deployments.id")),
        sa.Column("first_seen", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "deployment_targets",
        sa.Column("deployment_id", sa.String(64), sa.ForeignKey("deployments.id"), primary_key=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "connection_sessions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime()),
        sa.Column("end_reason", sa.String(32)),
        sa.Column("connection", sa.String(64), nullable=False),
    )
    op.create_index("ix_connection_sessions_device_id", "connection_sessions", ["device_id"])
    op.create_index("ix_connection_sessions_ended_at", "connection_sessions", ["ended_at"])
    op.create_table(
        "telemetry",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("interval_s", sa.Float(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_hist", sa.JSON(), nullable=False),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("cpu_percent", sa.Float()),
        sa.Column("rss_bytes", sa.BigInteger()),
        sa.Column("artifact", sa.String(64)),
        sa.Column("model_version", sa.String(256)),
        sa.UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
    )
    op.create_index("ix_telemetry_received_at", "telemetry", ["received_at"])


def downgrade() -> None:
    for table in ("telemetry", "connection_sessions", "deployment_targets", "devices", "deployments",
                  "artifacts"):
        op.drop_table(table)
