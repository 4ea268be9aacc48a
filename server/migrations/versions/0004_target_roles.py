"""Per-device roles in a deployment: which model file of the bundle a device runs (a variant or a
pipeline stage) and which shared service stage it serves (data-parallel pools, pipelines).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployment_targets") as b:
        b.add_column(sa.Column("file", sa.String(128), nullable=False, server_default=""))
        b.add_column(sa.Column("service", sa.String(64), nullable=False, server_default=""))
        b.add_column(sa.Column("stage", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("stages", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("deployment_targets") as b:
        for name in ("stages", "stage", "service", "file"):
            b.drop_column(name)
