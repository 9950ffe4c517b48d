"""nephos_address_free(net, ip): whether an address is free on a network, read afresh at each
call (PostgreSQL only). A create claims an address by trying its advisory lock; this function,
called once the lock is held, sees what was committed up to that moment -- a VOLATILE function
takes a new snapshot for each query it runs -- so the claim needs no second statement to find
the addresses another create committed between the claim's snapshot and its lock.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 03:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION nephos_address_free(net uuid, address text) RETURNS boolean
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            RETURN NOT EXISTS (SELECT 1 FROM ports WHERE network_id = net AND ip = address);
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS nephos_address_free(uuid, text)")
