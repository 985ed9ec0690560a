"""indexes for Query/Retrieve at hospital scale

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 00:30:00

- studies(study_description): StudyDescription single value / prefix wildcard matching.
- series(study_fk, modality): ModalitiesInStudy matching (EXISTS per study) and its return value.
- slice_results(series_fk, body_parts): IMAGE-level region queries within a series.
- patients(patient_birth_date): PatientBirthDate matching at PATIENT/STUDY level.
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index('ix_studies_description', ['study_description'], unique=False)
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index('ix_series_study_modality', ['study_fk', 'modality'], unique=False)
    with op.batch_alter_table('slice_results', schema=None) as batch_op:
        batch_op.create_index('ix_slice_results_series_body_parts', ['series_fk', 'body_parts'], unique=False)
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.create_index('ix_patients_birth_date', ['patient_birth_date'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_index('ix_patients_birth_date')
    with op.batch_alter_table('slice_results', schema=None) as batch_op:
        batch_op.drop_index('ix_slice_results_series_body_parts')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index('ix_series_study_modality')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_description')
