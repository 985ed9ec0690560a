"""results into the hospital: result objects and forward jobs (issue 14)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 05:00:00
"""
from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('results_version', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('payload', sa.Text(), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('payload')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('results_version')
