"""public ips: admin pools, addresses allocated to projects, the public_ip quota resource

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 17:44:00.011799
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "public_ip_pools",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("cidr", sa.String(length=43), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_public_ip_pools")),
        sa.UniqueConstraint("cidr", name=op.f("uq_public_ip_pools_cidr")),
        sa.UniqueConstraint("name", name=op.f("uq_public_ip_pools_name")),
    )
    op.create_table(
        "public_ips",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("pool_id", sa.Uuid(), nullable=False),
        sa.Column("address", sa.String(length=45), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=True),
        sa.Column("ec2_id", sa.String(length=32), nullable=False),
        sa.Column("association_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool_id"], ["public_ip_pools.id"], name=op.f("fk_public_ips_pool_id_public_ip_pools")
        ),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_public_ips_project_id_projects")),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name=op.f("fk_public_ips_server_id_servers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_public_ips")),
        sa.UniqueConstraint("address", name=op.f("uq_public_ips_address")),
        sa.UniqueConstraint("association_id", name=op.f("uq_public_ips_association_id")),
        sa.UniqueConstraint("ec2_id", name=op.f("uq_public_ips_ec2_id")),
    )
    with op.batch_alter_table("public_ips", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_public_ips_pool_id"), ["pool_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_public_ips_project_id"), ["project_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_public_ips_server_id"), ["server_id"], unique=False)

    with op.batch_alter_table("commissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("public_ip", sa.BigInteger(), server_default="0", nullable=False))

    # Every existing project gets the new resource's quota row (the default limit, nothing used).
    op.execute(
        "INSERT INTO quotas (project_id, resource, hard_limit, usage) "
        "SELECT id, 'public_ip', 5, 0 FROM projects p WHERE NOT EXISTS "
        "(SELECT 1 FROM quotas q WHERE q.project_id = p.id AND q.resource = 'public_ip')"
    )


def downgrade() -> None:
    op.execute("DELETE FROM quotas WHERE resource = 'public_ip'")
    with op.batch_alter_table("commissions", schema=None) as batch_op:
        batch_op.drop_column("public_ip")

    with op.batch_alter_table("public_ips", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_public_ips_server_id"))
        batch_op.drop_index(batch_op.f("ix_public_ips_project_id"))
        batch_op.drop_index(batch_op.f("ix_public_ips_pool_id"))

    op.drop_table("public_ips")
    op.drop_table("public_ip_pools")
