"""Rollouts: one row per gated deployment (canary -> waves), holding the rollout engine's state
as JSON (``server.rollout.Rollout.to_dict``) next to the columns operators query.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("deployment_id", sa.String(64), sa.ForeignKey("deployments.id"), nullable=False),
        sa.Column("artifact", sa.String(64), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("previous", sa.JSON(), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
    )
    op.create_index("ix_rollouts_deployment_id", "rollouts", ["deployment_id"], unique=True)
    op.create_index("ix_rollouts_phase", "rollouts", ["phase"])


def downgrade() -> None:
    op.drop_index("ix_rollouts_phase", "rollouts")
    op.drop_index("ix_rollouts_deployment_id", "rollouts")
    op.drop_table("rollouts")
