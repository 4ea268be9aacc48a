"""Fleet health at scale: hourly rollups with per-bucket latency counts, drift rollups and
baselines, predictions + feedback, device events, the devices' latest health report.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

N_BUCKETS = 72  # sdk.protocol.histogram.N_BUCKETS when this revision was written
N_DRIFT_BINS = 48  # sdk.protocol.drift.N_BINS


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("health", sa.JSON()))
        b.add_column(sa.Column("health_at", sa.DateTime()))
        b.add_column(sa.Column("uptime_s", sa.Float()))
    with op.batch_alter_table("telemetry") as b:
        b.add_column(sa.Column("health", sa.JSON()))
    op.create_index("ix_telemetry_device_received", "telemetry", ["device_id", "received_at"])
    op.create_table(
        "telemetry_hourly",
        sa.Column("hour", sa.DateTime(), primary_key=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("artifact", sa.String(64), primary_key=True),
        sa.Column("model_version", sa.String(256), primary_key=True),
        sa.Column("intervals", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        *(sa.Column(f"b{i:02d}", sa.BigInteger(), nullable=False) for i in range(N_BUCKETS)),
    )
    op.create_index("ix_telemetry_hourly_device_hour", "telemetry_hourly", ["device_id", "hour"])
    op.create_table(
        "drift_hourly",
        sa.Column("hour", sa.DateTime(), primary_key=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("artifact", sa.String(64), primary_key=True),
        sa.Column("intervals", sa.BigInteger(), nullable=False),
        *(sa.Column(f"{p}{i:02d}", sa.BigInteger(), nullable=False)
          for p in ("im", "is", "out") for i in range(N_DRIFT_BINS)),
    )
    op.create_table(
        "drift_baselines",
        sa.Column("artifact", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("intervals", sa.Integer(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("predicted", sa.Integer(), nullable=False),
        sa.Column("artifact", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_predictions_request_id", "predictions", ["request_id"])
    op.create_index("ix_predictions_received_at", "predictions", ["received_at"])
    op.create_table(
        "feedback",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_events_at", "events", ["at"])
    op.create_index("ix_events_device_at", "events", ["device_id", "at"])


def downgrade() -> None:
    for table in ("events", "feedback", "predictions", "drift_baselines", "drift_hourly", "telemetry_hourly"):
        op.drop_table(table)
    op.drop_index("ix_telemetry_device_received", "telemetry")
    with op.batch_alter_table("telemetry") as b:
        b.drop_column("health")
    with op.batch_alter_table("devices") as b:
        for col in ("uptime_s", "health_at", "health"):
            b.drop_column(col)
