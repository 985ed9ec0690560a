"""queue: early completeness, database-clock leases (issue 13)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 05:00:00
"""
from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # When an association carrying instances of the series was released: the early completeness signal.
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("released_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("released_at")
