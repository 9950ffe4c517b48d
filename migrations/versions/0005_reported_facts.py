"""idempotency records name what they created; jobs keep what the agent reported; hosts say
their hypervisor (and their migration URI, now set)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 11:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_records") as batch:
        batch.add_column(sa.Column("resource", sa.String(length=255), nullable=True))
        batch.create_index("ix_idempotency_records_resource", ["resource"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("details", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("domain_state", sa.String(length=16), nullable=True))
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("hypervisor", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("hypervisor")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("size_bytes")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("domain_state")
        batch.drop_column("details")
    with op.batch_alter_table("idempotency_records") as batch:
        batch.drop_index("ix_idempotency_records_resource")
        batch.drop_column("resource")
