"""decide(): the pure middle of a reconcile (what to apply, what to prune), and the rollout timing
and revision identity it relies on."""

import copy
from datetime import datetime, timedelta, timezone

import pytest

from llmserve.operator import rollout as r
from llmserve.operator.analysis import INCONCLUSIVE, Criteria, Verdict
from llmserve.operator.reconcile import Children, Observation, StableSpecError, decide
from llmserve.operator.render import Images
from llmserve.operator.spec import Spec

IMAGES = Images(puller="llmserve/llmserve:test", predictor="llmserve/predictor:test")
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def parent(version=1, **spec):
    return {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "chat", "namespace": "team", "uid": "u-1", "generation": 1, "resourceVersion": "9"},
            "spec": {"model": {"name": "m", "repository": "pvc://models/repo", "version": version},
                     "replicas": 1, **spec}}


def owned(kind, name, uid="u-1"):
    return {"kind": kind, "metadata": {"name": name, "namespace": "team", "uid": f"{name}-uid",
                                       "ownerReferences": [{"uid": uid, "controller": True}]}}


def first_status(obj):
    """The status after the first reconcile: the revision is stable."""
    spec = Spec.from_object(obj)
    plan = r.plan(spec.rollout, spec.serving, spec.replicas, None, r.Observed(), NOW)
    return copy.deepcopy(plan.status)


def applied(decision):
    return sorted((o["kind"], o["metadata"]["name"].removeprefix("chat")) for wave in decision.waves for o in wave)


def test_a_new_service_gets_only_children_that_protect_something():
    """One replica and no rollout: no PDB (an eviction may take the only pod anyway) and no track
    Services (they would select the pods the entry Service selects). Fewer requests and ClusterIPs
    per new service."""
    obj = parent()
    spec = Spec.from_object(obj)
    decision = decide(obj, spec, Children(), Observation(NOW), IMAGES)
    assert applied(decision) == [("Deployment", f"-{spec.revision}"), ("Service", "")]
    assert decision.prune == [] and decision.problems == []


def test_the_pdb_with_replicas_and_the_track_services_with_a_rollout_or_once_they_exist():
    obj = parent(replicas=2)
    assert ("PodDisruptionBudget", "") in applied(decide(obj, Spec.from_object(obj), Children(), Observation(NOW),
                                                         IMAGES))
    rolling = parent(version=2)
    rolling["status"] = first_status(parent(version=1))
    assert {("Service", "-stable"), ("Service", "-canary")} <= set(
        applied(decide(rolling, Spec.from_object(rolling), Children(), Observation(NOW), IMAGES)))
    routed = parent(rollout={"traffic": {"gatewayRef": {"name": "web"}}})
    assert {("Service", "-stable"), ("Service", "-canary")} <= set(
        applied(decide(routed, Spec.from_object(routed), Children(), Observation(NOW, gateway=True), IMAGES)))
    kept = parent()
    children = Children(services=[owned("Service", "chat-stable"), owned("Service", "chat-canary")],
                        disruption_budgets=[owned("PodDisruptionBudget", "chat")])
    assert {("Service", "-stable"), ("Service", "-canary"), ("PodDisruptionBudget", "")} <= set(
        applied(decide(kept, Spec.from_object(kept), children, Observation(NOW), IMAGES)))


def test_one_prune_path_for_every_kind_the_service_stops_needing():
    """A superseded revision's Deployment, an autoscaler no longer asked for, a route no longer
    used, and nothing that is not ours."""
    obj = parent()
    obj["status"] = {**first_status(obj), "traffic": {"route": "chat"}}
    spec = Spec.from_object(obj)
    children = Children(deployments=[owned("Deployment", f"chat-{spec.revision}"), owned("Deployment", "chat-v0-old"),
                                     owned("Deployment", "chat-foreign", uid="someone-else")],
                        autoscalers=[owned("HorizontalPodAutoscaler", "chat")])
    seen = Observation(NOW, unwatched=[owned("HTTPRoute", "chat")])
    decision = decide(obj, spec, children, seen, IMAGES)
    pruned = {(o["kind"], o["metadata"]["name"]): why for o, why in decision.prune}
    assert set(pruned) == {("Deployment", "chat-v0-old"), ("HorizontalPodAutoscaler", "chat"), ("HTTPRoute", "chat")}
    assert "no longer served" in pruned["Deployment", "chat-v0-old"]
    assert "spec.autoscaling" in pruned["HorizontalPodAutoscaler", "chat"]


def test_the_route_comes_after_the_services_it_points_at():
    obj = parent(rollout={"traffic": {"gatewayRef": {"name": "gw"}}})
    decision = decide(obj, Spec.from_object(obj), Children(), Observation(NOW, gateway=True), IMAGES)
    assert [o["kind"] for o in decision.waves[-1]] == ["HTTPRoute"]
    assert "Service" in {o["kind"] for o in decision.waves[0]}


def test_a_stable_revision_that_cannot_be_rendered_is_reported():
    obj = parent(version=2)
    obj["status"] = first_status(parent(version=1))
    obj["status"]["stable"]["spec"] = {"model": {"name": "m", "version": 1, "repository": "s3://nowhere"}}
    with pytest.raises(StableSpecError, match="stable revision .* cannot be rendered"):
        decide(obj, Spec.from_object(obj), Children(), Observation(NOW), IMAGES)


def test_an_analysed_step_past_its_pause_waits_for_the_next_check_not_zero_seconds():
    """The pause is over, the check is inconclusive: the next run is due when the next check is,
    not at once (which was a busy loop for as long as the check stayed inconclusive)."""
    policy = r.Policy(steps=(r.Step(50, 2), r.Step(100, 0)), analysis=Criteria(interval=5))
    v1 = {"model": {"name": "m", "version": 1, "repository": "pvc://c/r"}}
    v2 = {"model": {"name": "m", "version": 2, "repository": "pvc://c/r"}}
    status = r.plan(policy, v1, 2, None, r.Observed(), NOW).status
    t = NOW
    for ready in (0, 1):  # start the rollout, then the canary pod is ready: the step is reached
        t += timedelta(seconds=1)
        status = copy.deepcopy(r.plan(policy, v2, 2, status, r.Observed(2, ready), t).status)
    t += timedelta(seconds=5)
    verdict = Verdict(INCONCLUSIVE, "too few requests", None, None)
    plan = r.plan(policy, v2, 2, status, r.Observed(1, 1), t, verdict=verdict)
    assert plan.status["rollout"]["step"] == 0 and plan.requeue_after == pytest.approx(5)


def test_defaults_spelled_out_do_not_change_the_revision():
    """The API server adds the CRD's defaults to every object it reads: a chart upgrade adding one
    must not make every service a new revision (a rollout restarting every GPU pod)."""
    bare = {"model": {"name": "m", "version": 3, "repository": "pvc://c/r"}, "runtime": {"image": "t:1"}}
    defaulted = copy.deepcopy(bare)
    defaulted["runtime"].update(r.SERVING_DEFAULTS["runtime"])
    assert r.revision_name(defaulted) == r.revision_name(bare)
    assert r.revision_name({**bare, "runtime": {**bare["runtime"], "gpus": 2}}) != r.revision_name(bare)
    assert r.revision_name({"model": bare["model"], "runtime": dict(r.SERVING_DEFAULTS["runtime"])}) == \
        r.revision_name({"model": bare["model"]})
