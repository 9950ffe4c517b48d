"""firewall rules: ports opened on a VM (a VM's groups add theirs)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 17:00:15.882768
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "firewall_rules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("protocol", sa.String(length=8), nullable=False),
        sa.Column("port_min", sa.Integer(), nullable=False),
        sa.Column("port_max", sa.Integer(), nullable=False),
        sa.Column("cidr", sa.String(length=43), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name=op.f("fk_firewall_rules_server_id_servers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_firewall_rules")),
        sa.UniqueConstraint(
            "server_id",
            "protocol",
            "port_min",
            "port_max",
            "cidr",
            name=op.f("uq_firewall_rules_server_id_protocol_port_min_port_max_cidr"),
        ),
    )
    with op.batch_alter_table("firewall_rules", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_firewall_rules_server_id"), ["server_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("firewall_rules", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_firewall_rules_server_id"))

    op.drop_table("firewall_rules")
