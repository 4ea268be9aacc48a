"""Where a service stage's time goes: ``Telemetry.stage`` per interval (pipelines and replica
pools), so fleet health can name the bottleneck stage.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stage_telemetry",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("stages", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("timed", sa.BigInteger(), nullable=False),
        sa.Column("transfer_ms", sa.Float(), nullable=False),
        sa.Column("wait_ms", sa.Float(), nullable=False),
        sa.Column("compute_ms", sa.Float(), nullable=False),
        sa.Column("forward_ms", sa.Float(), nullable=False),
    )
    op.create_index("ix_stage_telemetry_received_at", "stage_telemetry", ["received_at"])
    op.create_index("ix_stage_telemetry_device_received", "stage_telemetry", ["device_id", "received_at"])


def downgrade() -> None:
    op.drop_table("stage_telemetry")
