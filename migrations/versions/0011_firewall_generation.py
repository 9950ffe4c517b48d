"""firewall generation: servers.firewall_gen counts changes of a VM's intended rules; hosts
record the generation they enforce, and reconciliation compares the two

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 19:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("firewall_gen", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.drop_column("firewall_gen")
