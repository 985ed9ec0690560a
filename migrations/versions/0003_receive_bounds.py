"""receive: VR-sized columns, protected studies, retention (issue 11)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 05:00:00
"""
from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Text columns are already sized by their VR's maximum (SH 16, LO 64, PN 324, CS 16, ...);
    # dicomnode.db.index truncates a longer value, with a log line, the same on every database.
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('protected', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('protected')
