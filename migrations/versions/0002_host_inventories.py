"""host inventories

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 23:50:39.074262
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("inventory", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("inventory_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("migration_uri", sa.String(length=512), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("migration_uri")
        batch_op.drop_column("inventory_at")
        batch_op.drop_column("inventory")
