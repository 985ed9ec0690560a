"""Routing rules by anatomy: which slices a rule selects, and a DCMTK storescp as the "liver CAD" that
receives exactly the liver slices (+ margin) of a real series, and nothing of a series without liver."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from dicomnode.config import RemoteAE, RoutingRule
from dicomnode.db.index import counts
from dicomnode.db.models import Job
from dicomnode.results.content import load_series_results
from dicomnode.results.jobs import enqueue_in
from dicomnode.results.routing import routed_slices, rule_fires
from dicomnode.results.runner import process_next
from results_data import classified, classify_as, received_sops, storescp


def _rule(region="liver", margin=0, min_slices=1, port=104) -> RoutingRule:
    return RoutingRule(region=region, destination=RemoteAE("LIVERCAD", "127.0.0.1", port), margin_slices=margin,
                       min_slices=min_slices)


@pytest.fixture
def philips(node_ctx):
    stored, sid = classified(node_ctx)
    with node_ctx.sessions() as s:
        return stored, load_series_results(s, sid)


def test_liver_slices_with_margin_clipped_to_the_series(philips):
    stored, res = philips
    sops = stored.philips_sops  # liver is instances 59-64, the last slice of the series is 64
    assert [s.sop_instance_uid for s in routed_slices(_rule(), res)] == [sops[n] for n in range(59, 65)]
    assert [s.sop_instance_uid for s in routed_slices(_rule(margin=2), res)] == [sops[n] for n in range(57, 65)]
    assert [s.sop_instance_uid for s in routed_slices(_rule("lungs", margin=1), res)] == \
        [sops[n] for n in range(55, 63)]


def test_min_slices_and_absent_regions_do_not_fire(philips):
    _stored, res = philips
    assert rule_fires(_rule(min_slices=6), res)
    assert not rule_fires(_rule(min_slices=7), res) and routed_slices(_rule(min_slices=7), res) == []
    assert not rule_fires(_rule("pelvis"), res)


def _run_all(ctx) -> list[str]:
    outcomes = []
    while (outcome := process_next(ctx.config, ctx.sessions, "test-owner")) is not None:
        outcomes.append(outcome)
    return outcomes


def test_liver_cad_receives_exactly_the_liver_slices_and_nothing_without_liver(node_ctx, tmp_path):
    stored, sid = classified(node_ctx)
    # the GE series classified as lungs only: a series without liver
    ge_id = classify_as(node_ctx, stored.ge_series, [("lungs", 0, 2)])
    out = tmp_path / "livercad"
    with storescp(out) as port:
        node_ctx.config.routing.rules = [_rule(margin=2, port=port)]
        with node_ctx.sessions.begin() as s:
            assert [j.kind for j in enqueue_in(s, node_ctx.config, sid)] == ["forward"]
            assert enqueue_in(s, node_ctx.config, ge_id) == []
        assert _run_all(node_ctx) == ["done"]
    sops = stored.philips_sops
    assert received_sops(out) == sorted(sops[n] for n in range(57, 65))
    with node_ctx.sessions() as s:
        assert counts(s)["jobs_by_kind"]["forward"] == {"done": 1}
        job = s.scalar(select(Job).where(Job.kind == "forward"))
        assert job.series_fk == sid and job.attempts == 1


def test_unreachable_cad_is_retried_then_failed(node_ctx):
    _stored, sid = classified(node_ctx)
    from conftest import free_port

    node_ctx.config.routing.rules = [_rule(port=free_port())]  # nobody listens there
    node_ctx.config.worker.max_attempts = 2
    node_ctx.config.worker.retry_backoff_s = 0.0
    with node_ctx.sessions.begin() as s:
        enqueue_in(s, node_ctx.config, sid)
    assert _run_all(node_ctx) == ["queued", "failed"]
    with node_ctx.sessions() as s:
        job = s.scalar(select(Job).where(Job.kind == "forward"))
        assert job.state == "failed" and job.attempts == 2 and "no association with LIVERCAD" in job.error
        assert counts(s)["jobs_by_kind"]["forward"] == {"failed": 1}
        # the series' classification state belongs to its classify job, not to the forward
        assert s.get(type(job.series), sid).classification_state == "done"


@pytest.mark.parametrize("rule, key", [
    ({"region": "spleen", "destination": {"ae_title": "CAD", "port": 11120}}, "routing.rules[0].region"),
    ({"region": "liver", "destination": {"ae_title": "", "port": 11120}}, "routing.rules[0].destination.ae_title"),
    ({"region": "liver", "destination": {"ae_title": "CAD", "port": 0}}, "routing.rules[0].destination.port"),
    ({"region": "liver", "destination": {"ae_title": "CAD"}, "margin_slices": -1}, "routing.rules[0].margin_slices"),
    ({"region": "liver", "destination": {"ae_title": "CAD"}, "min_slices": 0}, "routing.rules[0].min_slices"),
])
def test_bad_rules_name_their_key(rule, key):
    from dicomnode.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(f"'{key}")):
        load_config(None, {"routing.rules": [rule]})


def test_a_rule_and_a_destination_load():
    from dicomnode.config import load_config

    cfg = load_config(None, {"routing.rules": [{"region": "liver", "margin_slices": 2, "min_slices": 3,
                                                "destination": {"ae_title": "LIVERCAD", "port": 11120}}],
                             "results.destinations": [{"ae_title": "PACS", "host": "10.0.0.5", "port": 4242}]})
    assert cfg.routing.rules[0] == _rule(margin=2, min_slices=3, port=11120)
    assert cfg.results.destinations == [RemoteAE("PACS", "10.0.0.5", 4242)]


def test_a_forward_whose_lease_was_taken_over_stops_sending(node_ctx, tmp_path):
    from sqlalchemy import update

    from dicomnode.queue import jobs
    from dicomnode.results.jobs import process_job

    _stored, sid = classified(node_ctx)
    out = tmp_path / "livercad"
    with storescp(out) as port:
        node_ctx.config.routing.rules = [_rule(port=port)]
        node_ctx.config.worker.lease_s = 0.0  # extend the lease after every slice
        with node_ctx.sessions.begin() as s:
            enqueue_in(s, node_ctx.config, sid)
        job = jobs.claim_next(node_ctx.sessions, "runner-a", 0.0, kind="forward")
        with node_ctx.sessions.begin() as s:  # another runner claimed it meanwhile
            s.execute(update(Job).where(Job.id == job.id).values(lease_owner="runner-b"))
        assert process_job(node_ctx.config, node_ctx.sessions, job, "runner-a") == "lost"
    assert len(received_sops(out)) == 1  # the first slice went out, then the lost lease stopped it
    with node_ctx.sessions() as s:
        assert s.get(Job, job.id).lease_owner == "runner-b"
