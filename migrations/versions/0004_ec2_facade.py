"""ec2 facade: EC2 ids beside the UUIDs, tags, client tokens, protections, security groups

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 02:40:00.000000
"""

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ec2_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(9).hex()[:17]}"


def _backfill(table: str, column: str, prefix: str) -> None:
    """Give every existing row its own EC2 id (a random one, as new rows get)."""
    conn = op.get_bind()
    rows = conn.execute(sa.text(f"SELECT id FROM {table}")).all()
    for (row_id,) in rows:
        conn.execute(sa.text(f"UPDATE {table} SET {column} = :v WHERE id = :id"), {"v": _ec2_id(prefix), "id": row_id})


def upgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("ec2_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("reservation_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("client_token", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("disable_api_termination", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("disable_api_stop", sa.Boolean(), server_default=sa.false(), nullable=False))
    for table in ("images", "keypairs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("ec2_id", sa.String(length=32), nullable=True))
    _backfill("servers", "ec2_id", "i")
    _backfill("servers", "reservation_id", "r")
    _backfill("images", "ec2_id", "ami")
    _backfill("keypairs", "ec2_id", "key")
    with op.batch_alter_table("servers") as batch:
        batch.alter_column("ec2_id", existing_type=sa.String(length=32), nullable=False)
        batch.alter_column("reservation_id", existing_type=sa.String(length=32), nullable=False)
        batch.create_unique_constraint(batch.f("uq_servers_ec2_id"), ["ec2_id"])
        batch.create_index(batch.f("ix_servers_reservation_id"), ["reservation_id"], unique=False)
    for table in ("images", "keypairs"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("ec2_id", existing_type=sa.String(length=32), nullable=False)
            batch.create_unique_constraint(batch.f(f"uq_{table}_ec2_id"), ["ec2_id"])

    op.create_table(
        "ec2_tags",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("resource_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_ec2_tags_project_id_projects")),
        sa.PrimaryKeyConstraint("resource_id", "key", name=op.f("pk_ec2_tags")),
    )
    op.create_index(op.f("ix_ec2_tags_project_id"), "ec2_tags", ["project_id"], unique=False)
    op.create_table(
        "ec2_client_tokens",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("reservation_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_ec2_client_tokens_project_id_projects")),
        sa.PrimaryKeyConstraint("project_id", "token", name=op.f("pk_ec2_client_tokens")),
    )
    op.create_table(
        "security_groups",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("ec2_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_security_groups_project_id_projects")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_security_groups")),
        sa.UniqueConstraint("ec2_id", name=op.f("uq_security_groups_ec2_id")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_security_groups_project_id_name")),
    )
    op.create_table(
        "security_group_rules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("ec2_id", sa.String(length=32), nullable=False),
        sa.Column("group_id", sa.Uuid(), nullable=False),
        sa.Column("protocol", sa.String(length=8), nullable=False),
        sa.Column("from_port", sa.Integer(), nullable=False),
        sa.Column("to_port", sa.Integer(), nullable=False),
        sa.Column("cidr", sa.String(length=64), nullable=False),
        sa.Column("source_group", sa.String(length=32), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"], ["security_groups.id"], name=op.f("fk_security_group_rules_group_id_security_groups")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_security_group_rules")),
        sa.UniqueConstraint("ec2_id", name=op.f("uq_security_group_rules_ec2_id")),
        sa.UniqueConstraint(
            "group_id", "protocol", "from_port", "to_port", "cidr", "source_group", name="uq_security_group_rules_rule"
        ),
    )
    op.create_index(op.f("ix_security_group_rules_group_id"), "security_group_rules", ["group_id"], unique=False)
    op.create_table(
        "server_security_groups",
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("group_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"], ["security_groups.id"], name=op.f("fk_server_security_groups_group_id_security_groups")
        ),
        sa.ForeignKeyConstraint(
            ["server_id"], ["servers.id"], name=op.f("fk_server_security_groups_server_id_servers")
        ),
        sa.PrimaryKeyConstraint("server_id", "group_id", name=op.f("pk_server_security_groups")),
    )
    op.create_index(op.f("ix_server_security_groups_group_id"), "server_security_groups", ["group_id"], unique=False)


def downgrade() -> None:
    op.drop_table("server_security_groups")
    op.drop_table("security_group_rules")
    op.drop_table("security_groups")
    op.drop_table("ec2_client_tokens")
    op.drop_index(op.f("ix_ec2_tags_project_id"), table_name="ec2_tags")
    op.drop_table("ec2_tags")
    for table in ("images", "keypairs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(batch.f(f"uq_{table}_ec2_id"), type_="unique")
            batch.drop_column("ec2_id")
    with op.batch_alter_table("servers") as batch:
        batch.drop_index(batch.f("ix_servers_reservation_id"))
        batch.drop_constraint(batch.f("uq_servers_ec2_id"), type_="unique")
        batch.drop_column("disable_api_stop")
        batch.drop_column("disable_api_termination")
        batch.drop_column("client_token")
        batch.drop_column("reservation_id")
        batch.drop_column("ec2_id")
