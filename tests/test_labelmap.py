"""The label map: StudyDescription / BodyPartExamined terms to the five classes, never guessed."""

from __future__ import annotations

import pytest

from trainer.labelmap import CLASSES, load_label_map, normalize


@pytest.fixture(scope="module")
def default_map():
    return load_label_map()


def test_normalize_removes_accents_case_and_punctuation():
    assert normalize("CT Tórax/ABDOMEN  c/c") == "ct torax abdomen c c"
    assert normalize("HÍGADO") == "higado"
    assert normalize(None) == ""


@pytest.mark.parametrize("description,body_part,region", [
    ("CT Tórax", "", "lungs"),
    ("TÓRAX", "CHEST", "lungs"),
    ("Hígado trifásico", "", "liver"),
    ("CT LIVER", "ABDOMEN", "liver"),          # a broader region that holds the class
    ("TC CUELLO", "NECK", "neck"),
    ("Becken", "PELVIS", "pelvis"),
    ("CT Pulmonar", "", "lungs"),              # prefix term pulmon*
    ("", "LEG", "legs"),
    ("CT lower extremity angio", "", "legs"),  # a term of two words
])
def test_labelled(default_map, description, body_part, region):
    label = default_map.label(description, body_part)
    assert label.ok and label.region == region, label.describe()


@pytest.mark.parametrize("description,body_part,status", [
    ("Dr OLIVER control", "", "unmapped"),     # "liver" inside a word is not the term liver
    ("CT ABDOMEN", "", "unmapped"),            # broader region alone: which class is unknown
    ("", "", "unmapped"),
    ("LIVER", "HEAD", "ambiguous"),            # a class and a region outside the five
    ("CT Thorax Abdomen", "", "ambiguous"),    # abdomen does not hold lungs
    ("TC PIERNAS", "CHEST", "ambiguous"),      # two classes
    ("Neck Chest", "", "ambiguous"),
])
def test_left_out(default_map, description, body_part, status):
    label = default_map.label(description, body_part)
    assert label.status == status and label.region == ""


def test_describe_names_tag_term_and_class(default_map):
    text = default_map.label("LIVER", "HEAD").describe()
    assert "StudyDescription:liver->liver" in text and "BodyPartExamined:head->other" in text


def test_default_map_covers_the_five_classes(default_map):
    assert set(default_map.classes) == set(CLASSES)


def test_a_site_map_replaces_the_default(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("classes:\n  liver: [abdomen]\n  lungs: [chest]\nother: [head]\n", encoding="utf-8")
    site = load_label_map(path)
    assert site.label("CT ABDOMEN", "").region == "liver"
    assert not site.label("Hígado", "").ok


@pytest.mark.parametrize("text,message", [
    ("classes:\n  kidney: [renal]\n", "unknown class(es) kidney"),
    ("classes: [liver]\n", "'classes' must map class names"),
    ("classes:\n  liver: [liver]\nextra: 1\n", "unknown key(s) extra"),
    ("classes:\n  liver: [liver]\nother: [liver]\n", "listed under both"),
    ("classes:\n  liver: [liver]\nbroader:\n  abdomen: [kidney]\n", "broader term 'abdomen'"),
    ("classes:\n  liver: [\"*\"]\n", "empty once normalized"),
    ("classes: [unclosed\n", "not valid YAML"),
])
def test_bad_map_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r".*") as info:
        load_label_map(path)
    assert message in str(info.value) and "bad.yaml" in str(info.value)


def test_missing_map_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="mining.label_map"):
        load_label_map(tmp_path / "nope.yaml")
