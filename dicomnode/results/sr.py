"""The per-series Structured Report: a TID 1500 Measurement Report (highdicom's Comprehensive 3D SR).

One measurement group (TID 1501) per region range of the series: finding type "Anatomical structure",
finding site the region's CID 4031 SNOMED CT code (:mod:`dicomnode.results.anatomy`), tracking
identifier "<region> slices <first>-<last>", the algorithm (dicomnode's classifier, the model version)
and as its source images every slice of the range. Its measurements: the number of slices (a code of
dicomnode's private scheme 99DCMNODE: DICOM has no code for it) and the mean probability of the region
over those slices (DCM 122157 Probability, derivation SCT Mean, unit UCUM 1).

The SR goes into the source study, in a result series of its own (one per source series, UID derived
from the source series UID); each version of the classification is a new instance of that series
(Instance Number = the version).
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.results.anatomy import region_code
from dicomnode.results.content import SeriesResults, drop_incomplete_study_references, quiet, result_uid

ALGORITHM_NAME = "dicomnode body region classifier"
MANUFACTURER = "dicomnode"
#: dicomnode's private coding scheme (PS3.3 8.2: designators beginning "99" are private)
SCHEME = "99DCMNODE"
NUMBER_OF_SLICES = Code("REGION-SLICES", SCHEME, "Number of slices in region")
SLICES_UNIT = Code("{slices}", "UCUM", "slices")
NO_UNITS = Code("1", "UCUM", "no units")
CT_PROCEDURE = Code("77477000", "SCT", "Computerized tomography")
SR_SERIES_NUMBER = 9900


def sr_series_uid(results: SeriesResults) -> str:
    """The result series of the SRs of ``results``' source series (the same for every version)."""
    return result_uid(results.series_instance_uid, "sr-series")


def sr_instance_uid(results: SeriesResults) -> str:
    """The SR's SOP Instance UID for this version of the classification."""
    return result_uid(results.series_instance_uid, "sr", results.version)


def _group(results: SeriesResults, index: int) -> MeasurementsAndQualitativeEvaluations:
    region = results.regions[index]
    first, last = region.slices[0].position, region.slices[-1].position
    algorithm = AlgorithmIdentification(name=ALGORITHM_NAME, version=results.model_version or "unknown")
    site = FindingSite(anatomic_location=region_code(region.region))
    measurements = [
        Measurement(name=NUMBER_OF_SLICES, value=float(region.n_slices), unit=SLICES_UNIT, algorithm_id=algorithm),
        Measurement(name=codes.DCM.Probability, value=round(float(region.mean_probability), 6), unit=NO_UNITS,
                    derivation=codes.SCT.Mean, algorithm_id=algorithm),
    ]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=result_uid(results.series_instance_uid, "region", region.ordinal, results.version),
            identifier=f"{region.region} slices {first}-{last}"),
        finding_type=codes.SCT.AnatomicalStructure,
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=measurements,
        source_images=[SourceImageForMeasurementGroup.from_source_image(results.headers[s.sop_instance_uid])
                       for s in region.slices],
    )


@quiet
def build_sr(results: SeriesResults, ae_title: str = "DICOMNODE") -> Dataset:
    """The Measurement Report SR of one classified series (``results`` with its headers loaded).

    ``ae_title``: the node's, named as the device observer. Raises ``ValueError`` when a region has no
    slice or no code, or a header is missing.
    """
    if not results.slices:
        raise ValueError(f"series {results.series_instance_uid} has no classified slices")
    for region in results.regions:
        if not region.slices:
            raise ValueError(f"region {region.region} of series {results.series_instance_uid} has no slices")
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=result_uid("node", ae_title), name=ae_title, manufacturer_name=MANUFACTURER, model_name=ALGORITHM_NAME))
    evidence = [results.headers[s.sop_instance_uid] for s in results.slices]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CT_PROCEDURE,
        imaging_measurements=[_group(results, i) for i in range(len(results.regions))],
        referenced_images=evidence,
    )
    return drop_incomplete_study_references(Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=sr_series_uid(results),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_instance_uid(results),
        instance_number=max(1, results.version),
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="dicomnode body regions",
        coding_schemes=[CodingSchemeIdentificationItem(designator=SCHEME, name="dicomnode codes")],
    ))
