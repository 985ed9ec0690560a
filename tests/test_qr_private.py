"""The private block's IMAGE-level elements for the classes head and abdomen (dicomnode.qr.private)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomnode.qr import private


def _row(**kw):
    row = {"classification_state": "done", "model_version": "m1", "p_neck": 0.1, "p_lungs": 0.05, "p_liver": 0.0,
           "p_pelvis": 0.0, "p_legs": 0.0, "predicted": "head", "position": 0}
    row.update(kw)
    return row


def test_head_probability_is_returned_and_empty_for_a_model_without_the_class():
    ds = Dataset()
    private.add_image_block(ds, private.DEFAULT_BLOCK, _row(p_head=0.85, p_abdomen=None))
    block = ds.private_block(private.GROUP, private.PRIVATE_CREATOR)
    assert float(block[private.SLICE_P_HEAD].value) == 0.85
    assert block[private.SLICE_P_ABDOMEN].value in ("", None)
    assert len(block[private.SLICE_P].value) == 5 and block[private.SLICE_PREDICTED].value == "head"

    old = Dataset()  # a slice classified by a five-class model: p_head NULL
    private.add_image_block(old, private.DEFAULT_BLOCK, _row(p_head=None, p_abdomen=None, predicted="neck"))
    block = old.private_block(private.GROUP, private.PRIVATE_CREATOR)
    assert block[private.SLICE_P_HEAD].value in ("", None)


def test_unclassified_slice_has_empty_head_and_abdomen_elements():
    ds = Dataset()
    private.add_image_block(ds, private.DEFAULT_BLOCK, {"classification_state": "queued", "p_neck": None})
    block = ds.private_block(private.GROUP, private.PRIVATE_CREATOR)
    assert block[private.SLICE_P_HEAD].value in ("", None) and block[private.SLICE_P_ABDOMEN].value in ("", None)
