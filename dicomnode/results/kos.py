"""Per region range, a Key Object Selection document referencing the range's slices.

Document title DCM 113000 "Of Interest" (CID 7010), Key Object Description "<region> slices" (e.g.
"liver slices"), and a result series of its own per (source series, region) whose Series Description is
that text too, so a viewer's key-image or series list reads "liver slices". Several ranges of one region
(rare: the region appears twice) are one document. Each version of the classification is a new instance
(Instance Number = the version) of the same series.
"""

from __future__ import annotations

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicomnode.results.content import SeriesResults, drop_incomplete_study_references, quiet, result_uid
from dicomnode.results.sr import ALGORITHM_NAME, MANUFACTURER

KOS_SERIES_NUMBER = 9901


def kos_title(region: str) -> str:
    """What a viewer shows for the region's key images: ``"liver slices"``."""
    return f"{region} slices"


def kos_instance_uid(results: SeriesResults, region: str) -> str:
    return result_uid(results.series_instance_uid, "kos", region, results.version)


@quiet
def build_kos(results: SeriesResults, region: str, ae_title: str = "DICOMNODE") -> Dataset:
    """The KOS of ``region`` in one classified series (``results`` with its headers loaded).

    Raises ``ValueError`` when the series has no slice of that region.
    """
    slices = [s for r in results.region(region) for s in r.slices]
    if not slices:
        raise ValueError(f"series {results.series_instance_uid} has no {region} slices")
    referenced = [results.headers[s.sop_instance_uid] for s in slices]
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=result_uid("node", ae_title), name=ae_title, manufacturer_name=MANUFACTURER,
            model_name=ALGORITHM_NAME))
    content = KeyObjectSelection(document_title=codes.DCM.OfInterest, referenced_objects=referenced,
                                 observer_device_context=observer, description=kos_title(region))
    order = sorted({r.region for r in results.regions}, key=[r.region for r in results.regions].index)
    return drop_incomplete_study_references(KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=result_uid(results.series_instance_uid, "kos-series", region),
        series_number=KOS_SERIES_NUMBER + order.index(region),
        sop_instance_uid=kos_instance_uid(results, region),
        instance_number=max(1, results.version),
        manufacturer=MANUFACTURER,
        series_description=kos_title(region),
    ))
