"""The role a device reports running (status ``active``): model file, shared service and stage,
so the server knows which devices serve a service (a re-push that drops one makes it leave).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("model_file", sa.String(128), nullable=False, server_default=""))
        b.add_column(sa.Column("model_service", sa.String(64), nullable=False, server_default=""))
        b.add_column(sa.Column("model_stage", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("model_stages", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("devices") as b:
        for name in ("model_stages", "model_stage", "model_service", "model_file"):
            b.drop_column(name)
