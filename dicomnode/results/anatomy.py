"""Coded anatomy of the classifier's regions: CID 4031 (Common Anatomic Regions), SNOMED CT.

The codes are those PS3.16 Annex L pairs with the Body Part Examined defined terms the node writes
(NECK, LUNG, LIVER, PELVIS, LEG, HEAD, ABDOMEN); taken from pydicom's code dictionary.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: region (a class of the model) -> its SNOMED CT code in CID 4031
REGION_CODES: dict[str, Code] = {
    "head": codes.SCT.Head,
    "neck": codes.SCT.Neck,
    "lungs": codes.SCT.Lung,
    "liver": codes.SCT.Liver,
    "abdomen": codes.SCT.Abdomen,
    "pelvis": codes.SCT.Pelvis,
    "legs": codes.SCT.LowerLeg,
}


def region_code(region: str) -> Code:
    """The CID 4031 code of ``region``; ``ValueError`` naming it when the node has no code for it."""
    try:
        return REGION_CODES[region]
    except KeyError:
        raise ValueError(f"region {region!r} has no CID 4031 code (known: {', '.join(REGION_CODES)})") from None
