"""SQLAlchemy models of the index: patients, studies, series, instances, jobs and classification results.

The index holds metadata only; pixel data lives in files written by :mod:`dicomnode.receive.storage`.
Any change here needs an Alembic revision in ``migrations/versions``.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # PatientID is not unique across issuers; the key is (patient_id, issuer).
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    specific_character_set: Mapped[str] = mapped_column(String(128), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")

    __table_args__ = (
        UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patients_id_issuer"),
        Index("ix_patients_name", "patient_name"),
        Index("ix_patients_birth_date", "patient_birth_date"),  # 0002: Q/R
    )


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(256), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    specific_character_set: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # 0003: a protected study is never recycled by retention (dicomnode protect --study UID).
    protected: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (
        Index("ix_studies_date", "study_date"),
        Index("ix_studies_accession", "accession_number"),
        Index("ix_studies_description", "study_description"),  # 0002: Q/R
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(256), default="")
    # BodyPartExamined as the modality sent it; the classifier's result is in ``body_parts``.
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    specific_character_set: Mapped[str] = mapped_column(String(128), default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # receiving: instances still arriving; stable: quiet for stable_age_s (a job was enqueued).
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    stable_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # 0004: when an association that carried instances of this series was released (the early
    # completeness signal of dicomnode.queue.stability; StableAge stays the fallback).
    released_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # Classification: none, queued, running, done, failed, skipped.
    classification_state: Mapped[str] = mapped_column(String(16), default="none", index=True)
    classification_reason: Mapped[str] = mapped_column(Text, default="")
    model_version: Mapped[str] = mapped_column(String(128), default="")
    # Regions found, as DICOM Body Part Examined defined terms joined by backslash (LUNG\\LIVER).
    body_parts: Mapped[str] = mapped_column(String(128), default="")
    classified_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # 0005: version of the result documents (SR, KOS) and forwards, raised at each classification;
    # jobs of an older version are superseded (dicomnode.results).
    results_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    region_ranges: Mapped[list[RegionRange]] = relationship(
        back_populates="series", cascade="all, delete-orphan", order_by="RegionRange.ordinal"
    )

    __table_args__ = (Index("ix_series_study_modality", "study_fk", "modality"),)  # 0002: ModalitiesInStudy


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID, default="")
    # Path of the file relative to the storage folder.
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")

    series: Mapped[Series] = relationship(back_populates="instances")
    result: Mapped[SliceResult | None] = relationship(back_populates="instance", cascade="all, delete-orphan")

    __table_args__ = (Index("ix_instances_series_number", "series_fk", "instance_number"),)


class SliceResult(Base):
    """Per-slice output of the classifier: the class probabilities and the decoded region(s).

    ``p_head`` and ``p_abdomen`` (migration 0006) are NULL when the slice's model has no such class.
    """

    __tablename__ = "slice_results"

    instance_fk: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(128), default="")
    position: Mapped[int] = mapped_column(Integer, default=0)  # index in anatomical order (0 = top)
    z_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    p_neck: Mapped[float] = mapped_column(Float, default=0.0)
    p_lungs: Mapped[float] = mapped_column(Float, default=0.0)
    p_liver: Mapped[float] = mapped_column(Float, default=0.0)
    p_pelvis: Mapped[float] = mapped_column(Float, default=0.0)
    p_legs: Mapped[float] = mapped_column(Float, default=0.0)
    p_head: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0006: class head
    p_abdomen: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0006: class abdomen
    predicted: Mapped[str] = mapped_column(String(16), default="")  # argmax class name
    # Decoded region(s) as Body Part Examined terms joined by backslash ("LUNG\\LIVER" at a transition).
    body_parts: Mapped[str] = mapped_column(String(64), default="")

    instance: Mapped[Instance] = relationship(back_populates="result")

    __table_args__ = (Index("ix_slice_results_series_body_parts", "series_fk", "body_parts"),)  # 0002: Q/R


class RegionRange(Base):
    """One contiguous anatomical range of a series (e.g. the liver from instance 41 to 180)."""

    __tablename__ = "region_ranges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer, default=0)
    region: Mapped[str] = mapped_column(String(16))  # neck, lungs, liver, pelvis, legs
    body_part: Mapped[str] = mapped_column(String(16))  # NECK, LUNG, LIVER, PELVIS, LEG
    first_instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    last_sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    first_position: Mapped[int] = mapped_column(Integer, default=0)
    last_position: Mapped[int] = mapped_column(Integer, default=0)
    z_start_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    z_end_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_slices: Mapped[int] = mapped_column(Integer, default=0)
    mean_probability: Mapped[float] = mapped_column(Float, default=0.0)
    model_version: Mapped[str] = mapped_column(String(128), default="")

    series: Mapped[Series] = relationship(back_populates="region_ranges")


class Job(Base):
    """A durable queue entry. Workers claim one with a lease; an expired lease returns it to the queue."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), default="classify")
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    # queued, running, done, failed, skipped, cancelled
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # 0005: what a results or forward job sends and where (JSON; empty for classify jobs).
    payload: Mapped[str] = mapped_column(Text, default="", server_default="")

    series: Mapped[Series] = relationship()

    __table_args__ = (Index("ix_jobs_state_not_before", "state", "not_before"),)
