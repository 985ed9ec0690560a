"""Classify every slice of a series and find its region ranges: the pipeline of the worker and ``dicomnode classify``.

read + decode (native little-endian files straight from their bytes,
:mod:`dicomnode.classification.imaging.native`; every other one with pydicom,
:mod:`dicomnode.classification.imaging.pixels`) + preprocess (:mod:`dicomnode.classification.imaging.preprocess`)
run batch by batch in a thread pool, a few batches ahead of the inference that runs in the calling thread,
so decoding overlaps inference. Only the batches in flight are held in memory (``batch_size`` x
(``readers`` + ``prefetch``) slices), never the whole float volume, so a 2,000-slice series needs no more
memory than a 50-slice one. The probabilities (N x 5 floats) are kept; then :mod:`dicomnode.classification.regions`
decodes the ordered ranges.

The result (:class:`SeriesClassification`) is plain data; :meth:`SeriesClassification.to_dict` gives the
JSON of ``dicomnode classify --json``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pydicom

from dicomnode.classification.imaging.native import read_native_slice
from dicomnode.classification.imaging.pixels import dataset_to_hu, pixel_spacing_mm
from dicomnode.classification.imaging.series import SeriesError, SeriesPlan, SliceHeader, plan_series
from dicomnode.classification.regions import DecodeParams, decode_regions

log = logging.getLogger("dicomnode.classification.pipeline")

#: Width (pixels) of the coronal reformat kept for ``--plot``.
CORONAL_WIDTH = 256


class Cancelled(RuntimeError):
    """The caller asked the pipeline to stop (worker shutdown or lease lost)."""


@dataclass
class StageTimings:
    """Seconds spent per stage. read/preprocess are summed over the reader threads (they overlap)."""

    headers_s: float = 0.0
    read_decode_s: float = 0.0
    preprocess_s: float = 0.0
    infer_s: float = 0.0
    wait_s: float = 0.0  # inference thread waiting for decoded batches
    regions_s: float = 0.0
    store_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}

    def dominant(self) -> str:
        """Name of the stage that took longest (of read/decode, preprocess, infer, regions, store)."""
        stages = {"read_decode": self.read_decode_s, "preprocess": self.preprocess_s, "infer": self.infer_s,
                  "regions": self.regions_s, "store": self.store_s, "headers": self.headers_s}
        return max(stages, key=stages.get)


@dataclass
class SliceOutcome:
    """One classified slice, in anatomical order (position 0 = top)."""

    position: int
    sop_instance_uid: str
    instance_number: int | None
    z_mm: float | None
    probabilities: dict[str, float]
    predicted: str  # argmax class
    region: str  # decoded region (Viterbi path)
    regions: tuple[str, ...]  # decoded region(s); two at a shared transition
    frame: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"sop_instance_uid": self.sop_instance_uid, "instance_number": self.instance_number,
             "z_mm": _round(self.z_mm), "position": self.position,
             "probabilities": {k: round(v, 5) for k, v in self.probabilities.items()},
             "predicted": self.predicted, "region": self.region, "regions": list(self.regions)}
        if self.frame is not None:
            d["frame"] = self.frame
        return d


@dataclass
class RegionOutcome:
    """One contiguous region range of a series."""

    region: str
    body_part: str
    first_position: int
    last_position: int
    first_instance: int | None
    last_instance: int | None
    first_sop_instance_uid: str
    last_sop_instance_uid: str
    z_start_mm: float | None
    z_end_mm: float | None
    n_slices: int
    mean_probability: float

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["z_start_mm"], d["z_end_mm"] = _round(self.z_start_mm), _round(self.z_end_mm)
        d["mean_probability"] = round(self.mean_probability, 5)
        return d


@dataclass
class SeriesClassification:
    """Everything known about one series after classification (or why it was not classified)."""

    series_instance_uid: str
    status: str  # classified | skipped | failed
    reason: str = ""
    model_version: str = ""
    n_slices: int = 0
    order_source: str = ""
    notes: list[str] = field(default_factory=list)
    regions: list[RegionOutcome] = field(default_factory=list)
    slices: list[SliceOutcome] = field(default_factory=list)
    timings: StageTimings = field(default_factory=StageTimings)
    coronal: np.ndarray | None = None  # (N, CORONAL_WIDTH) HU, top -> bottom, when asked for

    @property
    def body_parts(self) -> list[str]:
        """Body Part Examined terms of the regions found, in anatomical order."""
        return [r.body_part for r in self.regions]

    def to_dict(self, with_slices: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "series_instance_uid": self.series_instance_uid, "status": self.status, "n_slices": self.n_slices,
            "model_version": self.model_version, "body_parts": self.body_parts,
            "regions": [r.to_dict() for r in self.regions],
        }
        if self.reason:
            d["reason"] = self.reason
        if self.notes:
            d["notes"] = list(self.notes)
        if self.order_source:
            d["order_source"] = self.order_source
        d["timings_s"] = self.timings.to_dict()
        if with_slices:
            d["slices"] = [s.to_dict() for s in self.slices]
        return d


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(float(v), nd)


def _read_slice(header: SliceHeader) -> tuple[np.ndarray, tuple[float, float] | None]:
    if header.frame is None:
        native = read_native_slice(header.path)
        if native is not None:
            return native[1], native[0].spacing_mm
    try:
        ds = pydicom.dcmread(str(header.path))
    except Exception as exc:
        raise ValueError(f"{header.path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    hu = dataset_to_hu(ds, header.frame)
    return hu, pixel_spacing_mm(ds, header.frame)


def _coronal_line(hu: np.ndarray) -> np.ndarray:
    """The middle row of a display-oriented slice (anterior-posterior centre), resampled to CORONAL_WIDTH."""
    row = hu[hu.shape[0] // 2]
    x = np.linspace(0, len(row) - 1, CORONAL_WIDTH)
    return np.interp(x, np.arange(len(row)), row).astype(np.float32)


def _prepare_batch(headers: list[SliceHeader], params, keep_coronal: bool):
    """Read, decode and preprocess one batch (runs in a reader thread)."""
    from dicomnode.classification.imaging.preprocess import preprocess_batch

    t0 = time.perf_counter()
    items, lines = [], []
    for h in headers:
        hu, spacing = _read_slice(h)
        items.append((hu, spacing))
        if keep_coronal:
            lines.append(_coronal_line(hu))
    t1 = time.perf_counter()
    x = preprocess_batch(items, params)
    t2 = time.perf_counter()
    return x, lines, t1 - t0, t2 - t1


def infer_plan(plan: SeriesPlan, model, batch_size: int = 32, readers: int = 2, prefetch: int = 2,
               keep_coronal: bool = False, cancel: threading.Event | None = None,
               timings: StageTimings | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (N, 5) of the plan's slices in plan order, decoding overlapped with inference.

    Raises ``ValueError`` naming the file when a slice does not decode, :class:`Cancelled` when ``cancel``
    is set between batches.
    """
    from dicomnode.classification.model import predict_proba

    timings = timings or StageTimings()
    slices = plan.slices
    n = len(slices)
    batch_size = max(1, int(batch_size))
    batches = [slices[i:i + batch_size] for i in range(0, n, batch_size)]
    probs = np.zeros((n, len(model.classes)), dtype=np.float32)
    coronal = np.zeros((n, CORONAL_WIDTH), dtype=np.float32) if keep_coronal else None
    in_flight: deque[Future] = deque()
    readers = max(1, int(readers))
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="dicomnode-read") as pool:
        next_batch = 0
        try:
            for b in range(len(batches)):
                while next_batch < len(batches) and len(in_flight) < readers + prefetch:
                    in_flight.append(pool.submit(_prepare_batch, batches[next_batch], model.preprocess, keep_coronal))
                    next_batch += 1
                if cancel is not None and cancel.is_set():
                    raise Cancelled("classification cancelled")
                t0 = time.perf_counter()
                x, lines, t_read, t_prep = in_flight.popleft().result()
                t1 = time.perf_counter()
                p = predict_proba(model, x)
                t2 = time.perf_counter()
                start = b * batch_size
                probs[start:start + len(p)] = p
                if coronal is not None:
                    coronal[start:start + len(lines)] = np.stack(lines)
                timings.wait_s += t1 - t0
                timings.infer_s += t2 - t1
                timings.read_decode_s += t_read
                timings.preprocess_s += t_prep
        finally:
            for fut in in_flight:
                fut.cancel()
    return probs, coronal


@dataclass
class EarlySlice:
    """One slice classified as it arrived, before its series was complete (see :func:`classify_files`)."""

    header: SliceHeader
    probabilities: np.ndarray  # (n_classes,) in the model's class order


def classify_files(paths: list[Path], model, cancel: threading.Event | None = None) -> list[EarlySlice | None]:
    """Read, decode and classify single-frame files one pass each, in any order: headers and probabilities.

    For the worker's early classification of slices while their series is still arriving; the series
    job later only orders the slices, decodes the regions and classifies what is missing. Each file is
    read once (its header from the same dataset as its pixels: the read of :class:`FileScan`). A file
    that does not read or decode, a multi-frame file or a slice out of scope on its own gives None: the
    series job meets it again and reports it with its reason. The per-slice computation is exactly that
    of :func:`infer_plan`, so the probabilities are the same.
    """
    if cancel is not None and cancel.is_set():
        raise Cancelled("classification cancelled")
    headers, decoded, _, _ = _scan_chunk([Path(p) for p in paths], model.preprocess, False)
    if cancel is not None and cancel.is_set():
        raise Cancelled("classification cancelled")
    out: list[EarlySlice | None] = [None] * len(paths)
    for (i, _, _, _), p in zip(decoded, _infer_decoded(model, decoded)):
        out[i] = EarlySlice(headers[i][0], p)
    return out


def classify_plan(plan: SeriesPlan, model, batch_size: int = 32, readers: int = 2, prefetch: int = 2,
                  keep_coronal: bool = False, cancel: threading.Event | None = None,
                  decode: DecodeParams | None = None, timings: StageTimings | None = None,
                  known: dict[str, np.ndarray] | None = None,
                  known_coronal: dict[str, np.ndarray] | None = None) -> SeriesClassification:
    """Classify an in-scope plan: per-slice probabilities, decoded regions and ranges.

    ``known``: probabilities already computed per SOP Instance UID (single-frame slices classified as
    they arrived, :func:`classify_files`, or read in the one pass of a :class:`FileScan`); only the other
    slices are read and inferred here. With ``keep_coronal``, ``known_coronal`` holds their coronal lines
    (a known slice without one is read again).
    """
    from dicomnode.classification.model import BODY_PARTS

    from dicomnode.classification.model import check_class_order

    check_class_order(model.classes, f"model {model.version}")  # region decoding needs the anatomical order
    timings = timings or StageTimings()
    t0 = time.perf_counter()
    result = SeriesClassification(plan.series_instance_uid, "classified", model_version=model.version,
                                  n_slices=len(plan.slices), order_source=plan.order_source, notes=list(plan.notes),
                                  timings=timings)
    if known:
        probs = np.zeros((len(plan.slices), len(model.classes)), dtype=np.float32)
        coronal = np.zeros((len(plan.slices), CORONAL_WIDTH), dtype=np.float32) if keep_coronal else None
        lines = known_coronal or {}
        missing = []
        for i, h in enumerate(plan.slices):
            uid = h.sop_instance_uid
            if h.frame is None and uid in known and (coronal is None or uid in lines):
                probs[i] = known[uid]
                if coronal is not None:
                    coronal[i] = lines[uid]
            else:
                missing.append(i)
        if missing:
            rest = SeriesPlan(plan.series_instance_uid, [plan.slices[i] for i in missing])
            probs[missing], rest_coronal = infer_plan(rest, model, batch_size, readers, prefetch, keep_coronal,
                                                      cancel, timings)
            if coronal is not None:
                coronal[missing] = rest_coronal
    else:
        probs, coronal = infer_plan(plan, model, batch_size, readers, prefetch, keep_coronal, cancel, timings)
    t1 = time.perf_counter()
    decoded = decode_regions(probs, decode, tuple(model.classes))
    classes = tuple(model.classes)
    for i, (h, z) in enumerate(zip(plan.slices, plan.z_mm)):
        result.slices.append(SliceOutcome(
            position=i, sop_instance_uid=h.sop_instance_uid, instance_number=h.instance_number, z_mm=z,
            probabilities={c: float(probs[i, k]) for k, c in enumerate(classes)},
            predicted=classes[int(np.argmax(probs[i]))], region=classes[decoded.path[i]],
            regions=decoded.members[i], frame=h.frame))
    for span in decoded.spans:
        first, last = plan.slices[span.first], plan.slices[span.last]
        result.regions.append(RegionOutcome(
            region=span.region, body_part=BODY_PARTS.get(span.region, span.region.upper()),
            first_position=span.first, last_position=span.last, first_instance=first.instance_number,
            last_instance=last.instance_number, first_sop_instance_uid=first.sop_instance_uid,
            last_sop_instance_uid=last.sop_instance_uid, z_start_mm=plan.z_mm[span.first],
            z_end_mm=plan.z_mm[span.last], n_slices=span.n_slices, mean_probability=span.mean_probability))
    result.coronal = coronal
    timings.regions_s += time.perf_counter() - t1
    timings.total_s += time.perf_counter() - t0
    return result


@dataclass
class ScannedFiles:
    """What one pass over the files gave (:meth:`FileScan.collect`)."""

    #: per file, in file order: its headers, or the reason it could not be read
    headers: list[tuple[Path, list[SliceHeader] | str]] = field(default_factory=list)
    #: probabilities per SOP Instance UID (the first copy of each), in the model's class order
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    #: coronal line per SOP Instance UID, when asked for
    coronal: dict[str, np.ndarray] = field(default_factory=dict)
    timings: StageTimings = field(default_factory=StageTimings)


#: Resampled slices that a file scan keeps in flight (read ahead of inference), at most.
SCAN_LOOKAHEAD_BYTES = 64 << 20


def _scan_chunk(paths: list[Path], params, keep_coronal: bool):
    """Read each file of a chunk once (in a reader process or thread): its headers, and for a single-frame
    slice that is in scope on its own, (its index in ``paths``, SOP Instance UID, resampled HU (S, S),
    coronal line or None). Never imports torch."""
    from dicomnode.classification.imaging.preprocess import resample_hu
    from dicomnode.classification.imaging.series import scope_reason

    t_read = t_prep = 0.0
    headers: list[list[SliceHeader] | str] = []
    decoded: list[tuple[int, str, np.ndarray, np.ndarray | None]] = []
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        hs, hu, ds = _read_file(path)
        headers.append(hs)
        if isinstance(hs, str) or len(hs) != 1 or hs[0].frame is not None or scope_reason(hs, 1):
            t_read += time.perf_counter() - t0
            continue  # multi-frame, out of scope or unreadable: the series job deals with it
        if hu is None and ds is not None:
            try:
                hu = dataset_to_hu(ds, None)
            except ValueError as exc:  # the series job reads it again and fails with this reason
                log.debug("%s not classified in the first pass: %s", path, exc)
        if hu is None:
            t_read += time.perf_counter() - t0
            continue
        t1 = time.perf_counter()
        decoded.append((i, hs[0].sop_instance_uid, resample_hu(hu, hs[0].spacing_mm, params),
                        _coronal_line(hu) if keep_coronal else None))
        t_read += t1 - t0
        t_prep += time.perf_counter() - t1
    return headers, decoded, t_read, t_prep


def _read_file(path: Path) -> tuple[list[SliceHeader] | str, np.ndarray | None, pydicom.Dataset | None]:
    """Read a file once: its headers (or why they cannot be read), and either its HU image (a native
    little-endian single-frame slice, read straight from its bytes by
    :mod:`~dicomnode.classification.imaging.native`) or the dataset pydicom read, whose pixels the
    caller decodes if it needs them (None when only the header could be read)."""
    from dicomnode.classification.imaging.series import headers_from_dataset, read_headers

    native = read_native_slice(path)
    if native is not None:
        return [native[0]], native[1], None
    try:
        ds = pydicom.dcmread(str(path))
        return headers_from_dataset(ds, path), None, ds
    except Exception:  # perhaps only its pixel data is broken: read the header alone, as group_series does
        try:
            return read_headers(path), None, None
        except ValueError as exc:
            return str(exc), None, None


def _infer_decoded(model, decoded: list[tuple[int, str, np.ndarray, np.ndarray | None]]) -> np.ndarray:
    """Probabilities of the slices :func:`_scan_chunk` decoded (windows, then the net)."""
    from dicomnode.classification.imaging.preprocess import windows_to_channels
    from dicomnode.classification.model import predict_proba

    if not decoded:
        return np.zeros((0, len(model.classes)), dtype=np.float32)
    return predict_proba(model, windows_to_channels(np.stack([r for _, _, r, _ in decoded]), model.preprocess))


class FileScan:
    """One pass over files that reads each of them once: the headers to group, scope and order the series
    by, and the probabilities of every single-frame slice that is in scope on its own (CT image, axial, no
    localizer, not tiny), decoded, preprocessed and inferred from the same read.

    Reading starts when the scan is made: in ``readers`` processes when neither torch nor onnxruntime is
    imported yet (they fork before their thread pools start; ``dicomnode classify`` makes the scan first
    and loads the model while they read), in threads otherwise. ``pool``: an executor the caller keeps
    between scans (the worker's reader processes, started from a fork server and so safe beside a loaded
    runtime); it is used instead and left running. If a reader process dies, the rest is read in
    threads and ``pool_broken`` is set. Only chunks in flight are held (at most
    :data:`SCAN_LOOKAHEAD_BYTES` of resampled slices). The probability of a slice does not depend on its
    neighbours, so they equal those of :func:`infer_plan` on the ordered series; a slice left out here
    (multi-frame, out of scope, pixels that do not decode) is met again by :func:`classify_plan`, which
    reads it or reports why it cannot.
    """

    def __init__(self, paths: list[Path], params, batch_size: int = 32, readers: int = 2,
                 keep_coronal: bool = False, pool: Executor | None = None) -> None:
        import sys
        from concurrent.futures import ProcessPoolExecutor

        self.paths = list(paths)
        self.params = params
        self.keep_coronal = keep_coronal
        size = self.batch_size = max(1, int(batch_size))
        self._chunks = deque(self.paths[i:i + size] for i in range(0, len(self.paths), size))
        self._readers = max(1, int(readers))
        chunk_bytes = size * params.size * params.size * 4
        self._lookahead = max(2 * self._readers, SCAN_LOOKAHEAD_BYTES // chunk_bytes)
        self._in_flight: deque[tuple[list[Path], Future]] = deque()
        self._given_pool = pool
        self.pool_broken = False
        if pool is not None:
            self.processes = isinstance(pool, ProcessPoolExecutor)
            self._pool = pool
        else:
            self.processes = (not {"torch", "onnxruntime"} & set(sys.modules) and hasattr(os, "fork")
                              and len(self._chunks) > 1)
            self._pool = self._make_pool(self.processes)
        self._fill()

    def _make_pool(self, processes: bool):
        if processes:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            if self.params.clear_outside_body:  # imported once here, not again in every forked reader
                from dicomnode.classification.imaging.body import load_labeller

                load_labeller()
            return ProcessPoolExecutor(self._readers, mp_context=multiprocessing.get_context("fork"))
        return ThreadPoolExecutor(self._readers, thread_name_prefix="dicomnode-scan")

    def _fill(self) -> None:
        from concurrent.futures.process import BrokenProcessPool

        while self._chunks and len(self._in_flight) < self._lookahead:
            chunk = self._chunks[0]
            try:
                future = self._pool.submit(_scan_chunk, chunk, self.params, self.keep_coronal)
            except BrokenProcessPool as exc:  # a reader died before this chunk went out
                self._to_threads(exc)
                return
            self._in_flight.append((self._chunks.popleft(), future))

    def _to_threads(self, reason: BaseException) -> None:
        """A reader process died: read what is left (the chunks in flight again) in threads."""
        log.warning("reader process failed (%s: %s); reading on in threads", type(reason).__name__, reason)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.pool_broken = True
        self._given_pool = None  # broken: the caller makes a new one
        self._chunks.extendleft(reversed([chunk for chunk, _ in self._in_flight]))
        self._in_flight.clear()
        self.processes = False
        self._pool = self._make_pool(False)
        self._fill()

    def collect(self, model, cancel: threading.Event | None = None) -> ScannedFiles:
        """Infer every chunk as it arrives (in this thread); returns what the pass found."""
        from concurrent.futures.process import BrokenProcessPool

        if model.preprocess != self.params:  # read for another model: read again for this one
            self.close()
            self.__init__(self.paths, model.preprocess, self.batch_size, self._readers, self.keep_coronal,
                          self._given_pool)
        out = ScannedFiles()
        t_start = time.perf_counter()
        first_file: dict[str, int] = {}  # SOP Instance UID -> position of its first file (group_headers keeps it)
        try:
            while self._in_flight:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("classification cancelled")
                chunk, fut = self._in_flight[0]
                t0 = time.perf_counter()
                try:
                    headers, decoded, t_read, t_prep = fut.result()
                except BrokenProcessPool as exc:
                    self._to_threads(exc)
                    continue
                self._in_flight.popleft()
                self._fill()
                t1 = time.perf_counter()
                probs = _infer_decoded(model, decoded)
                t2 = time.perf_counter()
                out.timings.wait_s += t1 - t0
                out.timings.infer_s += t2 - t1
                out.timings.read_decode_s += t_read
                out.timings.preprocess_s += t_prep
                offset = len(out.headers)
                out.headers += list(zip(chunk, headers))
                for i, hs in enumerate(headers):
                    for h in ([] if isinstance(hs, str) else hs):
                        first_file.setdefault(h.sop_instance_uid, offset + i)
                for (i, uid, _, line), p in zip(decoded, probs):
                    if first_file[uid] == offset + i:
                        out.probabilities[uid] = p
                        if line is not None:
                            out.coronal[uid] = line
        finally:
            self.close()
        out.timings.total_s = time.perf_counter() - t_start
        return out

    def close(self) -> None:
        """Stop reading (pending chunks are dropped)."""
        self._chunks.clear()
        for _, fut in self._in_flight:
            fut.cancel()
        self._in_flight.clear()
        if self._pool is not self._given_pool:  # a pool given by the caller stays up for its next scan
            self._pool.shutdown(wait=True, cancel_futures=True)


def classify_paths(paths: Iterable[str | os.PathLike[str]], model, min_slices: int = 1, batch_size: int = 32,
                   readers: int = 2, keep_coronal: bool = False, decode: DecodeParams | None = None,
                   scan: FileScan | None = None) -> tuple[list[SeriesClassification], list[str]]:
    """Classify every series found under ``paths`` (files or folders); returns (results, file problems).

    Each file is read once (a :class:`FileScan`: headers and probabilities from one read; ``scan`` is one
    already started on ``paths``' files, as ``dicomnode classify`` starts it before loading the model);
    then each series is scoped, ordered and its regions decoded. A series out of scope comes back
    ``skipped`` with its reason; one that fails (inconsistent geometry, undecodable slice) comes back
    ``failed`` with the error; neither stops the others.
    """
    from dicomnode.classification.imaging.series import group_headers, iter_files

    if scan is None:
        scan = FileScan(list(iter_files(paths)), model.preprocess, batch_size, readers, keep_coronal)
    scanned = scan.collect(model)
    groups, problems = group_headers(scanned.headers)
    n_files = max(1, sum(len(h) for h in groups.values()))
    results = []
    for uid, headers in groups.items():
        share = len(headers) / n_files  # the one pass, shared out among the series by their slices
        timings = StageTimings(**{k: v * share for k, v in scanned.timings.__dict__.items()})
        try:
            plan = plan_series(headers, min_slices)
            if not plan.in_scope:
                log.info("series %s skipped: %s", uid, plan.skip_reason)
                results.append(SeriesClassification(uid, "skipped", plan.skip_reason, model.version,
                                                    len(headers), timings=timings))
                continue
            result = classify_plan(plan, model, batch_size, readers, keep_coronal=keep_coronal, decode=decode,
                                   timings=timings, known=scanned.probabilities, known_coronal=scanned.coronal)
            log.info("series %s: %d slices, regions %s (%.2f s)", uid, result.n_slices,
                     " ".join(f"{r.region}[{r.first_position}-{r.last_position}]" for r in result.regions) or "-",
                     timings.total_s)
            results.append(result)
        except (SeriesError, ValueError) as exc:
            log.warning("series %s failed: %s", uid, exc)
            results.append(SeriesClassification(uid, "failed", str(exc), model.version, len(headers),
                                                timings=timings))
    return results, problems


def results_to_json(results: list[SeriesClassification], with_slices: bool = True) -> dict[str, Any]:
    """The ``{"series": [...]}`` document of ``dicomnode classify --json``."""
    return {"series": [r.to_dict(with_slices) for r in results]}
