"""stream events: the live event stream (GET /api/v1/events/stream), written in the transaction
that made each event, positioned by (writing transaction id, serial)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 20:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stream_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("xid", sa.BigInteger(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stream_events")),
        sqlite_autoincrement=True,  # a serial is never given twice, even after a purge
    )
    op.create_index("ix_stream_events_position", "stream_events", ["xid", "id"])
    op.create_index("ix_stream_events_project_position", "stream_events", ["project_id", "xid", "id"])


def downgrade() -> None:
    op.drop_table("stream_events")
