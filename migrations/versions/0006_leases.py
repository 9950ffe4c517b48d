"""leases: a policy per project, and one-off scheduled actions (the lease's end among them)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 12:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lease_policies",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("duration_s", sa.BigInteger(), nullable=True),
        sa.Column("max_lifetime_s", sa.BigInteger(), nullable=True),
        sa.Column("warn_before_s", sa.JSON(), nullable=False),
        sa.Column("on_expiry", sa.String(length=16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name=op.f("fk_lease_policies_project_id_projects")),
        sa.PrimaryKeyConstraint("project_id", name=op.f("pk_lease_policies")),
    )
    op.create_table(
        "scheduled_actions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["server_id"], ["servers.id"], name=op.f("fk_scheduled_actions_server_id_servers")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduled_actions")),
    )
    op.create_index(op.f("ix_scheduled_actions_server_id"), "scheduled_actions", ["server_id"])
    op.create_index("ix_scheduled_actions_state_at", "scheduled_actions", ["state", "at"])


def downgrade() -> None:
    op.drop_index("ix_scheduled_actions_state_at", table_name="scheduled_actions")
    op.drop_index(op.f("ix_scheduled_actions_server_id"), table_name="scheduled_actions")
    op.drop_table("scheduled_actions")
    op.drop_table("lease_policies")
