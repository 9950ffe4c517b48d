"""network pool: the admin's range that networks made without a CIDR come from

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "network_pool",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cidr", sa.String(length=43), nullable=False),
        sa.Column("prefix", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_network_pool")),
    )


def downgrade() -> None:
    op.drop_table("network_pool")
