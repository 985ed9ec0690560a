"""classes head and abdomen: per-slice probabilities (issue 15)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 05:00:00

- slice_results.p_head, slice_results.p_abdomen: the probabilities of the classes head and abdomen.
  NULL when the model that classified the slice has no such class (a five-class model; the shipped
  model has head but no abdomen), so existing rows need no value.
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('slice_results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('p_head', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('p_abdomen', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('slice_results', schema=None) as batch_op:
        batch_op.drop_column('p_abdomen')
        batch_op.drop_column('p_head')
