"""networks and ports: a project's private networks and its VMs' NICs (fixed address, MAC)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 16:37:47.712470
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("cidr", sa.String(length=43), nullable=False),
        sa.Column("gateway", sa.String(length=45), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("ec2_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_networks_project_id_projects")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_networks")),
        sa.UniqueConstraint("cidr", name=op.f("uq_networks_cidr")),
        sa.UniqueConstraint("ec2_id", name=op.f("uq_networks_ec2_id")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_networks_project_id_name")),
    )
    with op.batch_alter_table("networks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_networks_project_id"), ["project_id"], unique=False)

    op.create_table(
        "ports",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("network_id", sa.Uuid(), nullable=False),
        sa.Column("ip", sa.String(length=45), nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("ec2_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["network_id"], ["networks.id"], name=op.f("fk_ports_network_id_networks")),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name=op.f("fk_ports_server_id_servers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ports")),
        sa.UniqueConstraint("ec2_id", name=op.f("uq_ports_ec2_id")),
        sa.UniqueConstraint("mac", name=op.f("uq_ports_mac")),
        sa.UniqueConstraint("network_id", "ip", name=op.f("uq_ports_network_id_ip")),
    )
    with op.batch_alter_table("ports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ports_network_id"), ["network_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ports_server_id"), ["server_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ports_server_id"))
        batch_op.drop_index(batch_op.f("ix_ports_network_id"))

    op.drop_table("ports")
    with op.batch_alter_table("networks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_networks_project_id"))

    op.drop_table("networks")
