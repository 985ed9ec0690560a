"""Alembic migrations of the dicomnode index (installed as ``dicomnode.migrations``)."""
