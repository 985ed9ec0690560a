"""PS3.4 C.2.2.2 matching, level by level, over real associations (pynetdicom SCU on loopback) against the node.

Every case asks the running node and compares the set of unique keys that come back with the set the
stored fixtures must give (tests/qr_data.py says what is stored).
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import create_engine, literal, select

import qr_data
from dicomnode.qr import matching
from dicomnode.qr.matching import QueryError


def c_find(port: int, identifier: Dataset, model=StudyRootQueryRetrieveInformationModelFind):
    """(final status, [identifiers]) of one C-FIND to the node on 127.0.0.1:port."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    results, final = [], None
    try:
        for status, ds in assoc.send_c_find(identifier, model):
            assert status, "no response from the node"
            if status.Status in (0xFF00, 0xFF01):
                results.append(ds)
            else:
                final = status.Status
    finally:
        assoc.release()
    return final, results


def ident(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def node_config(node_config, db_url):
    """The node's config on SQLite and, where a server is configured, on PostgreSQL (LIKE vs GLOB paths)."""
    if not db_url.startswith("sqlite"):
        from dicomnode.db.session import upgrade

        upgrade(db_url, backup=False)
        node_config.database_url = db_url
    return node_config


@pytest.fixture
def node(running_node):
    return running_node, qr_data.populate(running_node)


def _uids(results, keyword):
    return {str(getattr(ds, keyword)) for ds in results}


def test_study_level_matching(node):
    ctx, st = node
    port = ctx.config.port
    t100, t192 = st.torax["ISO_IR 100"], st.torax["ISO_IR 192"]
    everything = {st.philips_study, st.ge_study, st.small_study, t100, t192}
    cases = [
        ({"StudyDescription": ""}, everything),                                  # universal
        ({"StudyDescription": "*"}, everything),                                 # universal (wildcard only)
        ({"StudyDescription": "Chest"}, {st.philips_study}),                     # single value
        ({"StudyDescription": "chest"}, set()),                                  # case-sensitive (LO)
        ({"StudyDescription": "Ch*"}, {st.philips_study}),                       # wildcard *
        ({"StudyDescription": "?hest"}, {st.philips_study}),                     # wildcard ?
        ({"StudyDescription": "*rax"}, {t100, t192}),                            # leading *
        ({"StudyDate": "20030417"}, {st.ge_study}),                              # single date
        ({"StudyDate": "20000101-20051231"}, {st.ge_study, st.small_study}),     # closed range
        ({"StudyDate": "-20031231"}, {st.ge_study}),                             # open lower bound
        ({"StudyDate": "20200103-"}, {t192}),                                    # open upper bound
        ({"StudyTime": "0900-0959"}, {t100, t192}),                              # time range
        ({"StudyTime": "1046"}, {st.ge_study}),                                  # partial time = its whole minute
        ({"StudyInstanceUID": f"{st.ge_study}\\{t100}"}, {st.ge_study, t100}),   # UID list
        ({"StudyInstanceUID": st.philips_study}, {st.philips_study}),            # single UID
        ({"ModalitiesInStudy": "CT"}, everything),                               # computed key
        ({"ModalitiesInStudy": "MR"}, set()),
        ({"ModalitiesInStudy": "MR\\CT"}, everything),                           # list: any value
        ({"PatientName": "gómez^ana"}, {t100, t192}),                            # PN: case-insensitive
        ({"PatientName": "*^ANA"}, {t100, t192}),
        ({"StudyDescription": "Tórax", "StudyDate": "20200102"}, {t100}),        # keys combine with AND
    ]
    for keys, expected in cases:
        status, results = c_find(port, ident("STUDY", **{"StudyInstanceUID": "", **keys}))
        assert status == 0x0000, keys
        assert _uids(results, "StudyInstanceUID") == expected, keys
        assert len(results) == len(expected), f"one response per study: {keys}"


def test_patient_level_matching_patient_root(node):
    ctx, st = node
    port = ctx.config.port
    model = PatientRootQueryRetrieveInformationModelFind
    cases = [
        ({"PatientID": ""}, {"99000", "Lung_Dx-A0001", "1CT1", "TORAX-100", "TORAX-192"}),
        ({"PatientID": "TORAX-*"}, {"TORAX-100", "TORAX-192"}),
        ({"PatientID": "Lung_Dx-A0001"}, {"Lung_Dx-A0001"}),
        ({"PatientSex": "M"}, {"99000", "Lung_Dx-A0001"}),
        ({"PatientName": "CompressedSamples^CT?"}, {"1CT1"}),
    ]
    for keys, expected in cases:
        status, results = c_find(port, ident("PATIENT", NumberOfPatientRelatedInstances="", **keys), model)
        assert status == 0x0000, keys
        assert _uids(results, "PatientID") == expected, keys
    _, (lung,) = c_find(port, ident("PATIENT", PatientID="Lung_Dx-A0001", NumberOfPatientRelatedStudies="",
                                    NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances=""), model)
    assert (lung.NumberOfPatientRelatedStudies, lung.NumberOfPatientRelatedSeries,
            lung.NumberOfPatientRelatedInstances) == (1, 1, 10)


def test_series_level_matching(node):
    ctx, st = node
    port = ctx.config.port
    everything = {st.philips_series, st.ge_series, st.small_series}
    cases = [
        ({"BodyPartExamined": "LIVER"}, {st.philips_series}),          # a classified region (multi-valued)
        ({"BodyPartExamined": "LUNG"}, {st.philips_series}),
        ({"BodyPartExamined": "PELVIS"}, set()),
        ({"BodyPartExamined": "L?VER"}, {st.philips_series}),          # wildcard per stored value
        ({"BodyPartExamined": "CHEST"}, {st.small_series}),            # unclassified: the modality's value
        ({"BodyPartExamined": "PELVIS\\LIVER"}, {st.philips_series}),  # list: any
        ({"SeriesInstanceUID": f"{st.ge_series}\\{st.small_series}"}, {st.ge_series, st.small_series}),
        ({"SeriesNumber": "3"}, {st.philips_series}),                  # IS single value
        ({"Modality": "CT", "StudyInstanceUID": st.ge_study}, {st.ge_series}),
        ({"SeriesDescription": "*"}, None),                            # universal
    ]
    for keys, expected in cases:
        status, results = c_find(port, ident("SERIES", **{"SeriesInstanceUID": "", **keys}))
        assert status == 0x0000, keys
        got = _uids(results, "SeriesInstanceUID")
        if expected is None:
            assert everything <= got and len(got) == 5, keys
        else:
            assert got == expected, keys


def test_series_level_matching_on_private_state(node):
    ctx, st = node
    q = ident("SERIES", SeriesInstanceUID="")
    q.add_new(0x00110010, "LO", "DICOMNODE 1.0")
    q.add_new(0x00111001, "LO", "skipped")
    status, results = c_find(ctx.config.port, q)
    assert status == 0x0000
    assert _uids(results, "SeriesInstanceUID") == {st.ge_series}
    assert results[0][0x00111002].VR == "LT"  # explicit VR negotiated: the private VRs arrive
    assert results[0][0x00111002].value.startswith("3 slices")


def test_image_level_matching(node):
    ctx, st = node
    port = ctx.config.port
    sops = st.philips_sops
    cases = [
        ({"BodyPartExamined": "LIVER"}, st.liver_sops()),
        ({"BodyPartExamined": "LUNG"}, {sops[n] for n in range(55, 62)}),
        ({"BodyPartExamined": "NECK"}, set()),
        ({"InstanceNumber": "57"}, {sops[57]}),
        ({"SOPInstanceUID": f"{sops[55]}\\{sops[64]}"}, {sops[55], sops[64]}),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, set(sops.values())),
        ({"BodyPartExamined": "*"}, set(sops.values())),
    ]
    for keys, expected in cases:
        status, results = c_find(port, ident("IMAGE", **{"SeriesInstanceUID": st.philips_series,
                                                         "SOPInstanceUID": "", **keys}))
        assert status == 0x0000, keys
        assert _uids(results, "SOPInstanceUID") == expected, keys


def test_bad_values_are_refused_with_a_status(node):
    ctx, st = node
    port = ctx.config.port
    assert c_find(port, ident("STUDY", StudyDate="2020-01-01-02"))[0] == 0xC000
    assert c_find(port, ident("STUDY", StudyDate="yesterday"))[0] == 0xC000
    assert c_find(port, ident("STUDY", StudyInstanceUID="1.2.*"))[0] == 0xC000
    no_level = Dataset()
    no_level.StudyInstanceUID = ""
    assert c_find(port, no_level)[0] == 0xA900
    assert c_find(port, ident("PATIENT", PatientID=""))[0] == 0xA900  # no PATIENT level in the Study Root


def test_person_names_match_case_insensitively_in_unicode_on_both_databases(node):
    """PN matching ignores case the same way on SQLite and PostgreSQL, beyond ASCII: a stored MÜLLER^JÖRG
    is found by müller^jörg, Müller*, *JÖRG and not by MULLER (no accent folding)."""
    ctx, _ = node
    qr_data._store(ctx, qr_data._variant(qr_data.SMALL, "ISO_IR 192", PatientName="MÜLLER^JÖRG",
                                         PatientID="PN-UNICODE"))
    for value, hit in (("müller^jörg", True), ("Müller*", True), ("*JÖRG", True), ("mÜller^JöRG", True),
                       ("MULLER*", False)):
        final, results = c_find(ctx.config.port, ident("PATIENT", PatientName=value, PatientID="",
                                                       SpecificCharacterSet="ISO_IR 192"),
                                 PatientRootQueryRetrieveInformationModelFind)
        assert final == 0x0000
        assert (_uids(results, "PatientID") == {"PN-UNICODE"}) is hit, value


# The compiler itself, on a real SQLite database ------------------------------------------------------------

def test_patterns_escape_sql_wildcards():
    assert matching.like_pattern("a%b_c*d?!") == "a!%b!_c%d_!!"
    assert matching.glob_pattern("[x]*") == "[[]x]*"


@pytest.mark.parametrize("vr, value, stored, hit", [
    ("LO", "50%*", "50% off", True), ("LO", "50%*", "50 off", False), ("LO", "a_c", "abc", False),
    ("TM", "1100", "110059.5", True), ("TM", "-1100", "110100", False), ("TM", "1030-", "103000", True),
    ("DA", "2020.01.02", "20200102", True),
])
def test_clause_against_sqlite(vr, value, stored, hit):
    engine = create_engine("sqlite://")
    clause = matching.match_clause(literal(stored), value, vr, "Key", "sqlite")
    with engine.connect() as conn:
        assert bool(conn.execute(select(clause)).scalar()) is hit


def test_query_errors_name_the_attribute():
    with pytest.raises(QueryError, match="StudyDate"):
        matching.match_clause(literal("x"), "2020-01-01-", "DA", "StudyDate", "sqlite")
    with pytest.raises(QueryError, match="InstanceNumber: 'x' is not an integer"):
        matching.match_clause(literal(5), "x", "IS", "InstanceNumber", "sqlite")
    with pytest.raises(QueryError, match="Modality: wildcards"):
        matching.match_clause(literal("x"), "C*", "UI", "Modality", "sqlite")
