"""stream events: PostgreSQL wakes the streams from a statement trigger on stream_events, so a
committing transaction writes its events in one statement instead of an INSERT and a pg_notify

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 22:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The channel is app.logic.stream.CHANNEL; a notification is delivered at commit, once per
# channel and payload per transaction, whatever the number of statements that sent it.


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION nephos_stream_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('nephos_stream', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER stream_events_notify AFTER INSERT ON stream_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION nephos_stream_notify()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS stream_events_notify ON stream_events")
    op.execute("DROP FUNCTION IF EXISTS nephos_stream_notify()")
