"""The regions a model may name, in anatomical order, and their Body Part Examined terms (no torch)."""

from __future__ import annotations

#: Every region a model may name, top (head) to bottom; a model's classes are a subsequence of it, in this
#: order (region decoding moves only down this chain). ``abdomen`` is the lower abdomen between liver and
#: pelvis (kidneys, bowel); the shipped model has no abdomen class (too few labelled slices, see its card).
ANATOMICAL_ORDER: tuple[str, ...] = ("head", "neck", "lungs", "liver", "abdomen", "pelvis", "legs")
#: The classes of the shipped model and the trainer's default; the one place the class list is written.
#: Everything that runs a model (pipeline, index, query/retrieve) takes the class list from the loaded
#: checkpoint (``LoadedModel.classes``), so an older five-class checkpoint still works.
CLASSES: tuple[str, ...] = ("head", "neck", "lungs", "liver", "pelvis", "legs")
#: The five classes of Roth et al. (2015): the paper's comparison (see ``trainer.evaluate.FIVE_CLASS_VIEW``).
FIVE_CLASSES: tuple[str, ...] = ("neck", "lungs", "liver", "pelvis", "legs")
#: Body Part Examined (0018,0015) defined terms (DICOM PS3.16 Annex L) per region.
BODY_PARTS: dict[str, str] = {"head": "HEAD", "neck": "NECK", "lungs": "LUNG", "liver": "LIVER",
                              "abdomen": "ABDOMEN", "pelvis": "PELVIS", "legs": "LEG"}


def check_class_order(classes: tuple[str, ...] | list[str], where: str = "model") -> tuple[str, ...]:
    """``classes`` as a tuple when they are distinct regions of :data:`ANATOMICAL_ORDER` in that order.

    Raises ``ValueError`` naming ``where`` otherwise (region decoding needs the anatomical order).
    """
    out = tuple(str(c) for c in classes)
    unknown = [c for c in out if c not in ANATOMICAL_ORDER]
    if unknown or not out:
        raise ValueError(f"{where}: unknown class(es) {unknown or '(none)'}; known regions, top to bottom: "
                         f"{', '.join(ANATOMICAL_ORDER)}")
    idx = [ANATOMICAL_ORDER.index(c) for c in out]
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise ValueError(f"{where}: classes {out} are not in the anatomical order {ANATOMICAL_ORDER}")
    return out
