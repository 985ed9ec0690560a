"""Mine a PACS for labelled CT: query by keywords, pick key images, retrieve, label, write a manifest.

The steps are plain functions, run in order by :func:`mine`:

1. :func:`find_studies`: Study Root C-FIND at STUDY level, one query per keyword and case variant with
   a StudyDescription wildcard (:func:`keyword_wildcards`), ModalitiesInStudy CT, an optional StudyDate
   range split into smaller windows when the PACS caps its answers (:func:`find_windowed`). The answers
   are filtered on our side, case- and accent-insensitively (:func:`keyword_matches`: ``torax`` finds
   ``Tórax``), because a PACS matches wildcards case-sensitively and byte by byte.
2. :func:`find_series`, :func:`find_instances`: SERIES level (Modality, BodyPartExamined,
   SeriesDescription) and IMAGE level (SOPInstanceUID, position) C-FINDs.
3. Labels: :mod:`trainer.labelmap` maps StudyDescription + BodyPartExamined to one class or leaves the
   series out (ambiguous / unmapped, listed in ``excluded.csv``).
4. Key images: where the study has Key Object Selection documents (Modality KO) they are retrieved and
   the instances referenced by "Of Interest" documents are taken (:func:`key_images_from_kos`);
   rejection notes remove what they reject. Otherwise :func:`sample_evenly` takes
   ``mining.slices_per_series`` evenly spaced slices of each CT series.
5. Retrieval (:class:`trainer.pacs.Retriever`): C-MOVE to the node's storage SCP when it answers, else to the
   miner's own pynetdicom storage SCP (files written by :func:`dicomnode.receive.storage.write_atomic`), or
   C-GET. A C-MOVE that reports success but delivers nothing is a failure. At most
   ``mining.max_concurrent_moves`` retrievals run at once, with ``mining.pause_between_studies_s``
   between studies.
6. The manifest ``labels.csv`` (:data:`MANIFEST_COLUMNS`: the columns of ``shared/data/ct/labels.csv``
   plus ``study``, ``query`` and ``split``) is rewritten atomically after every study, so an
   interrupted run leaves a whole manifest, and a rerun fetches only what it lacks.

Patient identifiers never reach a log line or the manifest: the ``patient`` column holds
:func:`pseudonym` (a salted SHA-256 of the PatientID; the salt is made once per dataset folder and kept
in ``.pseudonym_salt`` beside the manifest, so reruns give the same ids). The ``split`` column is a
patient-level 80/20 train/val split, a function of ``--seed`` and the set of patients in the manifest.
The retrieved images themselves are the PACS's files, unchanged (not de-identified).
"""

from __future__ import annotations

import csv
import datetime as dt
import fnmatch
import hashlib
import io
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pydicom
from pydicom.dataset import Dataset

from dicomnode.receive import storage
from dicomnode.config import Config
from trainer.labelmap import CLASSES, Label, LabelMap, load_label_map, normalize
from trainer.pacs import (  # noqa: F401 - MiningError and parse_remote are part of this module's API
    CT_IMAGE_STORAGE, MiningError, Pacs, Retriever, dataset_path, describe_remote,
    our_ae, parse_remote,
)

log = logging.getLogger("trainer.mine")

#: Columns of ``shared/data/ct/labels.csv`` (with ``slice_index``, empty for DICOM) plus our own.
MANIFEST_COLUMNS = ["path", "slice_index", "patient", "series", "sop_instance_uid", "z_mm", "region", "source",
                    "label_method", "note", "study", "query", "split"]
EXCLUDED_COLUMNS = ["study", "series", "status", "reason", "study_description", "body_part_examined", "query"]
MANIFEST = "labels.csv"
EXCLUDED = "excluded.csv"
SALT_FILE = ".pseudonym_salt"
#: Document titles (DCM, CID 7010 / 7011): key images of interest, and the rejection notes.
OF_INTEREST = "113000"
REJECTION_NOTES = {"113001", "113037", "113038", "113039"}

# Options ---------------------------------------------------------------------------------------------

@dataclass
class MineOptions:
    """What one ``dicomnode mine`` run asks for (the rest comes from ``cfg.mining``)."""

    keywords: list[str]
    out_dir: Path
    since: dt.date | None = None
    until: dt.date | None = None
    dry_run: bool = False
    seed: int = 0
    progress: bool = True
    #: Called with the StudyInstanceUID after each study's rows are in the manifest (tests interrupt here).
    on_study_done: Callable[[str], None] | None = None


# Keyword matching -----------------------------------------------------------------------------------

_ACCENTED_VOWELS = set("aeiouy")


def keyword_wildcards(keyword: str) -> list[str]:
    """The StudyDescription wildcards sent to the PACS for one keyword: ``*kw*`` in lower, upper and
    title case, with each vowel replaced by ``*`` so that an accented letter still matches.

    A PACS matches case-sensitively and byte by byte (``*torax*`` does not find ``Tórax``); these
    patterns find a superset that :func:`keyword_matches` then filters.

    >>> keyword_wildcards("torax")
    ['*t*r*x*', '*T*R*X*', '*T*r*x*']
    """
    kw = keyword.strip()
    out: list[str] = []
    for variant in (kw.lower(), kw.upper(), kw[:1].upper() + kw[1:].lower()):
        chars = ["*" if c.lower() in _ACCENTED_VOWELS or not c.isascii() else c for c in variant]
        pattern = re.sub(r"\*+", "*", "*" + "".join(chars) + "*")
        if pattern.strip("*?") == "":
            pattern = "*"
        if pattern not in out:
            out.append(pattern)
    return ["*"] if "*" in out else out


def keyword_matches(keyword: str, text: str | None) -> bool:
    """True when ``keyword`` (with ``*`` / ``?`` wildcards) occurs in ``text``, ignoring case and accents."""
    pattern = normalize(keyword.replace("*", " STAR ").replace("?", " QMARK "))
    pattern = pattern.replace(" star ", "*").replace("star ", "*").replace(" star", "*").replace("star", "*")
    pattern = pattern.replace(" qmark ", "?").replace("qmark ", "?").replace(" qmark", "?").replace("qmark", "?")
    return fnmatch.fnmatchcase(normalize(text), f"*{pattern}*")


# Pseudonyms and splits ------------------------------------------------------------------------------

def load_salt(out_dir: Path) -> str:
    """The dataset folder's pseudonym salt, or a new random one (kept by :func:`keep_salt`)."""
    path = out_dir / SALT_FILE
    if path.is_file():
        return path.read_text(encoding="ascii").strip()
    return secrets.token_hex(16)


def keep_salt(out_dir: Path, salt: str) -> None:
    """Save the salt in the dataset folder (once), so that reruns give the same pseudonyms."""
    if not (out_dir / SALT_FILE).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(out_dir, SALT_FILE, salt.encode("ascii"))


def pseudonym(patient_id: str, salt: str, fallback: str = "") -> str:
    """A stable pseudonymous patient id: ``p`` + 16 hex digits of SHA-256(salt, PatientID).

    An empty PatientID uses ``fallback`` (the StudyInstanceUID): such a study is its own patient.
    """
    key = patient_id.strip() if patient_id and patient_id.strip() else f"study:{fallback}"
    return "p" + hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).hexdigest()[:16]


def assign_splits(patients: Iterable[str], seed: int, val_fraction: float = 0.2) -> dict[str, str]:
    """Patient-level split, deterministic by ``seed``: about ``val_fraction`` of the patients are ``val``.

    Patients are ordered by SHA-256(seed, patient) and the first round(n * val_fraction) (at least one
    when there are two or more patients) go to ``val``; the rest to ``train``.
    """
    unique = sorted(set(patients))
    if not unique:
        return {}
    order = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n_val = round(len(unique) * val_fraction)
    if len(unique) >= 2:
        n_val = max(n_val, 1)
    val = set(order[:n_val])
    return {p: ("val" if p in val else "train") for p in unique}


# Selection ------------------------------------------------------------------------------------------

def sample_evenly(items: list[Any], k: int) -> list[Any]:
    """``k`` items spread evenly over ``items`` (first and last included); all of them when ``k >= len``."""
    n = len(items)
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(items)
    if k == 1:
        return [items[n // 2]]
    indices = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in indices]


@dataclass
class KeyImages:
    """What the KOS documents of a study say: referenced instances per series, and rejected instances."""

    of_interest: dict[str, list[str]] = field(default_factory=dict)  # SeriesInstanceUID -> SOP UIDs
    rejected: set[str] = field(default_factory=set)
    documents: int = 0
    skipped: list[str] = field(default_factory=list)  # reasons, by SOPInstanceUID of the document


def _code_value(ds: Dataset) -> tuple[str, str, str]:
    seq = ds.get("ConceptNameCodeSequence")
    if not seq:
        return "", "", ""
    item = seq[0]
    return str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeMeaning", ""))


def _content_references(items: Any) -> list[str]:
    """SOP Instance UIDs of the IMAGE / COMPOSITE items of a content tree (depth first)."""
    uids: list[str] = []
    for item in items or []:
        if str(item.get("ValueType", "")) in ("IMAGE", "COMPOSITE"):
            for ref in item.get("ReferencedSOPSequence") or []:
                uid = str(ref.get("ReferencedSOPInstanceUID", ""))
                if uid:
                    uids.append(uid)
        uids += _content_references(item.get("ContentSequence"))
    return uids


def _references(ds: Dataset) -> list[tuple[str, str]]:
    """(SeriesInstanceUID, SOPInstanceUID) of the instances a KOS selects: the IMAGE items of its content
    tree, placed in their series by the CurrentRequestedProcedureEvidenceSequence (which lists them all)."""
    series_of: dict[str, str] = {}
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            series_uid = str(series.get("SeriesInstanceUID", ""))
            for sop in series.get("ReferencedSOPSequence") or []:
                uid = str(sop.get("ReferencedSOPInstanceUID", ""))
                if series_uid and uid:
                    series_of[uid] = series_uid
    selected = _content_references(ds.get("ContentSequence"))
    return [(series_of[uid], uid) for uid in dict.fromkeys(selected) if uid in series_of]


def key_images_from_kos(documents: Iterable[Dataset]) -> KeyImages:
    """Read KOS documents: "Of Interest" references are key images, rejection notes reject; others skipped."""
    result = KeyImages()
    for ds in documents:
        result.documents += 1
        code, scheme, meaning = _code_value(ds)
        uid = str(ds.get("SOPInstanceUID", "?"))
        refs = _references(ds)
        if scheme == "DCM" and code in REJECTION_NOTES:
            result.rejected.update(sop for _, sop in refs)
        elif scheme == "DCM" and code == OF_INTEREST:
            for series_uid, sop in refs:
                result.of_interest.setdefault(series_uid, [])
                if sop not in result.of_interest[series_uid]:
                    result.of_interest[series_uid].append(sop)
        else:
            result.skipped.append(f"KOS {uid}: title ({code}, {scheme}, {meaning!r}) is not 'Of Interest'")
    for series_uid in list(result.of_interest):
        kept = [s for s in result.of_interest[series_uid] if s not in result.rejected]
        if kept:
            result.of_interest[series_uid] = kept
        else:
            del result.of_interest[series_uid]
    return result


# Queries --------------------------------------------------------------------------------------------

def _dicom_date(d: dt.date | None) -> str:
    return d.strftime("%Y%m%d") if d else ""


def _date_range(since: dt.date | None, until: dt.date | None) -> str:
    if since is None and until is None:
        return ""
    return f"{_dicom_date(since)}-{_dicom_date(until)}"


EARLIEST = dt.date(1970, 1, 1)


def find_windowed(pacs: Pacs, make_identifier: Callable[[str], Dataset], since: dt.date | None,
                  until: dt.date | None, cap: int, warnings: list[str]) -> list[Dataset]:
    """C-FIND over [since, until], halving the date window while the PACS caps the answers.

    The cap is seen as a Cancel / Out of Resources status or as ``cap`` answers (mining.max_results_per_query).
    An open range is closed at 1970-01-01 / today before splitting. A single day still capped is kept
    as it is, with a warning in ``warnings`` (the retrieval is partial).
    """
    answers, truncated = pacs.find(make_identifier(_date_range(since, until)))
    if not truncated and not (cap and len(answers) >= cap):
        return answers
    lo, hi = since or EARLIEST, until or dt.date.today()
    if lo >= hi:
        warnings.append(f"the PACS capped the answers for {lo.isoformat()} at {len(answers)}: "
                        "some studies of that day may be missing")
        log.warning("C-FIND capped at %d answers for the single day %s: some studies may be missing",
                    len(answers), lo.isoformat())
        return answers
    mid = lo + (hi - lo) // 2
    log.info("the PACS capped C-FIND answers (%d) for %s..%s: splitting the date window", len(answers),
             lo.isoformat(), hi.isoformat())
    return (find_windowed(pacs, make_identifier, lo, mid, cap, warnings)
            + find_windowed(pacs, make_identifier, mid + dt.timedelta(days=1), hi, cap, warnings))


@dataclass
class StudyHit:
    """One study the keyword queries found."""

    study_uid: str
    description: str
    date: str
    patient: str  # pseudonym
    queries: list[str] = field(default_factory=list)


def _values(value: Any) -> list[str]:
    """A (possibly multi-valued) element value as a list of upper-case strings."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v).strip().upper() for v in value]
    return [v.strip().upper() for v in str(value).split("\\")]


def _study_identifier(description: str, date_range: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.StudyDescription = description
    ds.StudyDate = date_range
    ds.ModalitiesInStudy = "CT"
    ds.PatientID = ""
    return ds


def find_studies(pacs: Pacs, keywords: list[str], since: dt.date | None, until: dt.date | None, salt: str,
                 cap: int = 0, warnings: list[str] | None = None) -> list[StudyHit]:
    """CT studies whose StudyDescription matches any keyword (case- and accent-insensitive), by date then UID."""
    warnings = warnings if warnings is not None else []
    hits: dict[str, StudyHit] = {}
    for keyword in keywords:
        for wildcard in keyword_wildcards(keyword):
            answers = find_windowed(pacs, lambda rng: _study_identifier(wildcard, rng), since, until, cap, warnings)
            for ds in answers:
                uid = str(ds.get("StudyInstanceUID", "")).strip()
                description = str(ds.get("StudyDescription", "") or "")
                modalities = _values(ds.get("ModalitiesInStudy"))
                if modalities and "CT" not in modalities:
                    continue
                try:
                    storage.validate_uid(uid, "StudyInstanceUID")
                except storage.InvalidUID as exc:
                    warnings.append(f"a C-FIND answer was skipped: {exc}")
                    continue
                if not keyword_matches(keyword, description):
                    continue
                hit = hits.get(uid)
                if hit is None:
                    hit = hits[uid] = StudyHit(uid, description, str(ds.get("StudyDate", "") or ""),
                                               pseudonym(str(ds.get("PatientID", "") or ""), salt, uid))
                if keyword not in hit.queries:
                    hit.queries.append(keyword)
    return sorted(hits.values(), key=lambda h: (h.date, h.study_uid))


@dataclass
class SeriesInfo:
    series_uid: str
    modality: str
    body_part: str
    description: str
    number: str = ""


def find_level(pacs: Pacs, level: str, match: dict[str, str], unique_key: str, return_keys: tuple[str, ...],
               charset: str = "") -> list[tuple[str, Dataset]]:
    """C-FIND at ``level`` with the ``match`` keys; returns (unique key value, answer) for every answer that
    carries its unique key (answers without one are dropped)."""
    q = Dataset()
    if charset:
        q.SpecificCharacterSet = charset
    q.QueryRetrieveLevel = level
    for keyword, value in match.items():
        setattr(q, keyword, value)
    for keyword in (unique_key, *return_keys):
        setattr(q, keyword, "")
    answers, _ = pacs.find(q)
    found = []
    for ds in answers:
        uid = str(ds.get(unique_key, "")).strip()
        if uid:
            found.append((uid, ds))
    return found


def find_series(pacs: Pacs, study_uid: str) -> list[SeriesInfo]:
    """Every series of a study (SERIES level), with Modality, BodyPartExamined and SeriesDescription."""
    answers = find_level(pacs, "SERIES", {"StudyInstanceUID": study_uid}, "SeriesInstanceUID",
                         ("Modality", "BodyPartExamined", "SeriesDescription", "SeriesNumber"), charset="ISO_IR 192")
    out = []
    for uid, ds in answers:
        out.append(SeriesInfo(uid, str(ds.get("Modality", "") or "").upper(),
                              str(ds.get("BodyPartExamined", "") or ""), str(ds.get("SeriesDescription", "") or ""),
                              str(ds.get("SeriesNumber", "") or "")))
    return sorted(out, key=lambda s: s.series_uid)


@dataclass
class InstanceInfo:
    sop_uid: str
    sop_class: str
    number: int | None
    z: float | None
    image_type: str


def find_instances(pacs: Pacs, study_uid: str, series_uid: str) -> list[InstanceInfo]:
    """The instances of a series (IMAGE level), ordered along z (then InstanceNumber)."""
    answers = find_level(pacs, "IMAGE", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
                         "SOPInstanceUID", ("SOPClassUID", "InstanceNumber", "ImagePositionPatient", "ImageType"))
    out = []
    for uid, ds in answers:
        try:
            number = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        ipp = ds.get("ImagePositionPatient")
        try:
            z = float(ipp[2]) if ipp is not None and len(ipp) == 3 else None
        except (TypeError, ValueError):
            z = None
        image_type = "\\".join(_values(ds.get("ImageType")))
        out.append(InstanceInfo(uid, str(ds.get("SOPClassUID", "") or ""), number, z, image_type))
    return sorted(out, key=lambda i: (i.z is None, i.z if i.z is not None else 0.0,
                                      i.number if i.number is not None else 0, i.sop_uid))


def sampleable(instances: list[InstanceInfo]) -> list[InstanceInfo]:
    """Axial CT images: CT Image Storage (when the PACS says), not localizers."""
    return [i for i in instances if (not i.sop_class or i.sop_class == CT_IMAGE_STORAGE)
            and "LOCALIZER" not in i.image_type]


# Manifest -------------------------------------------------------------------------------------------

def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of an existing manifest (none when absent); ``ValueError`` naming the file when malformed."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("path", "sop_instance_uid", "patient") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"manifest {path} lacks column(s) {', '.join(missing)}: not a mining manifest")
        return [dict(row) for row in reader]


def write_csv_atomic(out_dir: Path, name: str, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    """Write a CSV next to its final name and rename it over: a reader sees the old file or the new one."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return storage.write_atomic(out_dir, name, buf.getvalue().encode("utf-8"))


def write_manifest(out_dir: Path, rows: list[dict[str, str]], seed: int) -> Path:
    """Recompute the patient-level split and write ``labels.csv`` atomically (sorted, stable)."""
    splits = assign_splits((r["patient"] for r in rows), seed)
    for row in rows:
        row["split"] = splits.get(row["patient"], "")
    rows.sort(key=lambda r: (r.get("study", ""), r.get("series", ""), _float(r.get("z_mm")), r["sop_instance_uid"]))
    return write_csv_atomic(out_dir, MANIFEST, MANIFEST_COLUMNS, rows)


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else 0.0
    except ValueError:
        return 0.0


def manifest_row(path: Path, out_dir: Path, hit: StudyHit, series: SeriesInfo, label: Label, source: str,
                 method: str) -> dict[str, str] | None:
    """One manifest row for a retrieved file (None when the file is not the DICOM it should be)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPInstanceUID", "ImagePositionPatient"])
    except Exception as exc:  # noqa: BLE001 - a broken file is reported, not fatal
        log.warning("retrieved file %s does not read back: %s", path.name, exc)
        return None
    ipp = ds.get("ImagePositionPatient")
    z = f"{float(ipp[2]):.4f}".rstrip("0").rstrip(".") if ipp is not None and len(ipp) == 3 else ""
    return {
        "path": path.relative_to(out_dir).as_posix(),
        "slice_index": "",
        "patient": hit.patient,
        "series": series.series_uid,
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "z_mm": z,
        "region": label.region,
        "source": source,
        "label_method": method,
        "note": label.describe(),
        "study": hit.study_uid,
        "query": "|".join(hit.queries),
    }


# The run --------------------------------------------------------------------------------------------

@dataclass
class SeriesPlan:
    series: SeriesInfo
    label: Label
    sop_uids: list[str]
    method: str


@dataclass
class MineResult:
    """What a run found, planned, fetched and left out."""

    studies: int = 0
    planned: list[tuple[StudyHit, SeriesPlan]] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)
    retrieved: int = 0
    already_present: int = 0
    warnings: list[str] = field(default_factory=list)
    manifest: Path | None = None

    @property
    def planned_instances(self) -> int:
        return sum(len(p.sop_uids) for _, p in self.planned)


def _exclusion(hit: StudyHit, series: SeriesInfo | None, status: str, reason: str) -> dict[str, str]:
    return {"study": hit.study_uid, "series": series.series_uid if series else "", "status": status,
            "reason": reason, "study_description": hit.description,
            "body_part_examined": series.body_part if series else "", "query": "|".join(hit.queries)}


def plan_study(pacs: Pacs, retriever: Retriever | None, hit: StudyHit, label_map: LabelMap, cfg: Config,
               out_dir: Path, dry_run: bool, result: MineResult) -> list[SeriesPlan]:
    """Series of one study: label each CT series, choose its instances (KOS key images or a sample)."""
    all_series = find_series(pacs, hit.study_uid)
    ct = [s for s in all_series if s.modality == "CT"]
    kos_series = [s for s in all_series if s.modality == "KO"]
    labels = {s.series_uid: label_map.label(hit.description, s.body_part) for s in ct}
    if not ct:
        result.excluded.append(_exclusion(hit, None, "no-ct-series", "the study has no CT series"))
    for s in ct:
        if not labels[s.series_uid].ok:
            result.excluded.append(_exclusion(hit, s, labels[s.series_uid].status, labels[s.series_uid].describe()))
    labelled = [s for s in ct if labels[s.series_uid].ok]
    if not labelled:
        return []

    keys: KeyImages | None = None
    if kos_series:
        if dry_run:
            return [SeriesPlan(s, labels[s.series_uid], [], f"key images from {len(kos_series)} KOS series "
                               "(resolved when retrieved)") for s in labelled]
        keys = _read_study_kos(pacs, retriever, hit, kos_series, out_dir)
        for reason in keys.skipped:
            result.warnings.append(f"study {hit.study_uid}: {reason}")
    plans = []
    k = cfg.mining.slices_per_series
    for s in labelled:
        if keys is not None and keys.of_interest:
            uids = keys.of_interest.get(s.series_uid, [])
            if uids:
                plans.append(SeriesPlan(s, labels[s.series_uid], uids,
                                        "tags:StudyDescription+BodyPartExamined; key images (KOS Of Interest)"))
            continue
        instances = sampleable(find_instances(pacs, hit.study_uid, s.series_uid))
        if keys is not None:
            instances = [i for i in instances if i.sop_uid not in keys.rejected]
        chosen = sample_evenly(instances, k)
        if chosen:
            plans.append(SeriesPlan(s, labels[s.series_uid], [i.sop_uid for i in chosen],
                                    f"tags:StudyDescription+BodyPartExamined; {len(chosen)} of {len(instances)} "
                                    "slices evenly spaced"))
    return plans


def _read_study_kos(pacs: Pacs, retriever: Retriever | None, hit: StudyHit, kos_series: list[SeriesInfo],
                    out_dir: Path) -> KeyImages:
    documents: list[Dataset] = []
    for s in kos_series:
        uids = [i.sop_uid for i in find_instances(pacs, hit.study_uid, s.series_uid)]
        missing = [u for u in uids if not dataset_path(out_dir, hit.study_uid, s.series_uid, u, kos=True).is_file()]
        if missing and retriever is not None:
            retriever.retrieve(hit.study_uid, s.series_uid, missing, kos=True)
        for u in uids:
            path = dataset_path(out_dir, hit.study_uid, s.series_uid, u, kos=True)
            if path.is_file():
                try:
                    documents.append(pydicom.dcmread(path))
                except Exception as exc:  # noqa: BLE001
                    log.warning("KOS %s does not read: %s", u, exc)
    return key_images_from_kos(documents)


def mine(cfg: Config, options: MineOptions, label_map: LabelMap | None = None) -> MineResult:
    """Run the whole mining: find, plan, retrieve (unless dry run), write the manifest after each study.

    A :class:`MiningError` (or an interruption) leaves the manifest as written after the last whole
    study; nothing is half-written.
    """
    from tqdm import tqdm

    m = cfg.mining
    if not options.keywords:
        raise ValueError("give at least one --keywords")
    if m.slices_per_series < 1:
        raise ValueError("config key 'mining.slices_per_series': must be at least 1")
    if m.max_concurrent_moves < 1:
        raise ValueError("config key 'mining.max_concurrent_moves': must be at least 1")
    label_map = label_map or load_label_map(m.label_map or None)
    out_dir = Path(options.out_dir).expanduser().resolve()
    calling = our_ae(cfg)
    pacs = Pacs(m.pacs, calling, m.timeout_s)
    result = MineResult()
    salt = load_salt(out_dir)
    manifest_path = out_dir / MANIFEST
    rows = read_manifest(manifest_path)
    have = {r["sop_instance_uid"] for r in rows if (out_dir / r["path"]).is_file()}
    rows = [r for r in rows if r["sop_instance_uid"] in have]
    source = f"PACS {describe_remote(m.pacs)}"
    retriever: Retriever | None = None
    try:
        hits = find_studies(pacs, options.keywords, options.since, options.until, salt, m.max_results_per_query,
                            result.warnings)
        result.studies = len(hits)
        log.info("%d CT stud(ies) match %s", len(hits), ", ".join(repr(k) for k in options.keywords))
        if not options.dry_run:
            keep_salt(out_dir, salt)
            retriever = Retriever(cfg, pacs, out_dir)
            retriever.start()
        bar = tqdm(total=0, unit="img", desc="mining", disable=not options.progress or options.dry_run)
        pool = ThreadPoolExecutor(max_workers=m.max_concurrent_moves, thread_name_prefix="mine-move")
        try:
            for n, hit in enumerate(hits):
                plans = plan_study(pacs, retriever, hit, label_map, cfg, out_dir, options.dry_run, result)
                result.planned += [(hit, p) for p in plans]
                if options.dry_run:
                    continue
                todo = [(p, [u for u in p.sop_uids if u not in have]) for p in plans]
                result.already_present += sum(len(p.sop_uids) - len(t) for p, t in todo)
                bar.total += sum(len(t) for _, t in todo)
                bar.refresh()
                futures = [(p, t, pool.submit(retriever.retrieve, hit.study_uid, p.series.series_uid, t))
                           for p, t in todo if t]
                new_rows: list[dict[str, str]] = []
                error: BaseException | None = None
                for plan, wanted, future in futures:
                    try:
                        got = future.result()
                    except BaseException as exc:  # wait for the others, then raise the first
                        error = error or exc
                        continue
                    bar.update(len(wanted))
                    if len(got) < len(wanted):
                        msg = (f"partial retrieval: {len(got)} of {len(wanted)} instance(s) of series "
                               f"{plan.series.series_uid} arrived; the rest is fetched on the next run")
                        log.warning(msg)
                        result.warnings.append(msg)
                    for uid in got:
                        row = manifest_row(dataset_path(out_dir, hit.study_uid, plan.series.series_uid, uid), out_dir,
                                           hit, plan.series, plan.label, source, plan.method)
                        if row is not None:
                            new_rows.append(row)
                if new_rows:
                    rows += new_rows
                    have.update(r["sop_instance_uid"] for r in new_rows)
                    result.retrieved += len(new_rows)
                    result.manifest = write_manifest(out_dir, rows, options.seed)
                if error is not None:
                    raise error
                log.info("study %s done (%d new instance(s))", hit.study_uid, len(new_rows))
                if options.on_study_done is not None:
                    options.on_study_done(hit.study_uid)
                if m.pause_between_studies_s > 0 and n + 1 < len(hits):
                    time.sleep(m.pause_between_studies_s)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        if not options.dry_run:
            result.manifest = write_manifest(out_dir, rows, options.seed)
            write_csv_atomic(out_dir, EXCLUDED, EXCLUDED_COLUMNS, result.excluded)
    finally:
        if retriever is not None:
            retriever.stop()
        pacs.close()
    return result


def summary(result: MineResult, dry_run: bool) -> str:
    """A few lines for the user: counts per class, exclusions, warnings (UIDs only, no patient data)."""
    per_class = {c: 0 for c in CLASSES}
    for _, plan in result.planned:
        per_class[plan.label.region] = per_class.get(plan.label.region, 0) + len(plan.sop_uids)
    lines = [f"{result.studies} matching CT stud(ies); {len(result.planned)} labelled series; "
             + ("would retrieve" if dry_run else "selected") + f" {result.planned_instances} instance(s): "
             + ", ".join(f"{c} {n}" for c, n in per_class.items())]
    if dry_run:
        for hit, plan in result.planned:
            lines.append(f"  {plan.label.region:<7} study {hit.study_uid} series {plan.series.series_uid}: "
                         f"{len(plan.sop_uids) or '?'} instance(s), {plan.method}")
    else:
        lines.append(f"retrieved {result.retrieved} new instance(s); {result.already_present} already in the manifest")
        if result.manifest:
            lines.append(f"manifest {result.manifest}")
    if result.excluded:
        lines.append(f"left out {len(result.excluded)} series or stud(ies) (ambiguous or unmapped labels"
                     + ("" if dry_run else f", listed in {EXCLUDED}") + "):")
        for e in result.excluded[:20]:
            lines.append(f"  {e['status']:<10} study {e['study']} {e['series']}: "
                         f"StudyDescription {e['study_description']!r}, BodyPartExamined "
                         f"{e['body_part_examined']!r} ({e['reason']})")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
