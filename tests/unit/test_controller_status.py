"""Status derived from observed children: conditions, reasons, transitions, events."""

from datetime import datetime, timezone

from llmserve.operator import conditions, rollout
from llmserve.operator.conditions import Condition
from llmserve.operator.spec import Spec, deployment_name
from llmserve.operator.status import Observation, Problem, compute, invalid, pod_summary, transition_events

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def spec(replicas=2, version=3):
    return Spec.from_object({"metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 7},
                             "spec": {"replicas": replicas,
                                      "model": {"name": "tiny", "repository": "pvc://m/r", "version": version}}})


def name(version=3):
    return deployment_name("chat", spec(version=version).revision)


def status_of(s, seen, previous, now):
    """compute() after the rollout plan the reconcile would have applied (nothing rolling out
    unless `previous` has another stable revision)."""
    ready = {d["metadata"]["name"]: d["status"]["readyReplicas"] for d in seen.deployments}
    stable = deployment_name("chat", ((previous or {}).get("stable") or {}).get("revision") or s.revision)
    observed = rollout.Observed(ready.get(stable, 0), ready.get(deployment_name("chat", s.revision), 0))
    plan = rollout.plan(s.rollout, s.serving, s.replicas, previous, observed,
                        datetime.fromisoformat(now.replace("Z", "+00:00")))
    return compute(s, seen, previous, now, plan)


def deployment(version=3, ready=2, replicas=2, generation=1, observed=1, deadline=False):
    conds = [{"type": "Progressing", "status": "False" if deadline else "True",
              "reason": "ProgressDeadlineExceeded" if deadline else "NewReplicaSetAvailable"}]
    return {"metadata": {"name": name(version), "generation": generation},
            "status": {"observedGeneration": observed, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas, "availableReplicas": ready, "conditions": conds}}


def pod(version=3, ready=False, **status):
    return pod_summary({"metadata": {"name": f"{name(version)}-abc", "labels": {
        "llmserve.io/model-version": str(version), "llmserve.io/revision": spec(version=version).revision}},
        "status": {"conditions": [{"type": "Ready", "status": str(ready)}], **status}})


UNSCHEDULABLE = {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}


def conds(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_ready_when_all_replicas_of_the_version_are_available():
    status = status_of(spec(), Observation(deployments=[deployment()]), None, T0)
    assert conds(status) == {"Ready": ("True", "Available"), "Progressing": ("False", "Complete"),
                             "Degraded": ("False", "Healthy")}
    assert status["observedGeneration"] == 7
    assert status["stable"] == {"version": 3, "revision": spec().revision, "deployment": name(3), "replicas": 2,
                                "readyReplicas": 2, "weight": 100, "spec": spec().serving}
    assert status["rollout"] == {"phase": "Complete", "revision": spec().revision}
    assert [h["outcome"] for h in status["history"]] == ["Promoted"] and "canary" not in status
    assert status["replicas"] == 2
    assert status["selector"] == "llmserve.io/service=chat,app.kubernetes.io/managed-by=llmserve"
    assert status["endpoint"] == "http://chat.ns.svc:8080"
    assert all(c["observedGeneration"] == 7 and c["lastTransitionTime"] == T0 for c in status["conditions"])


def test_creating_and_starting():
    assert conds(status_of(spec(), Observation(), None, T0))["Ready"] == ("False", "Creating")
    starting = status_of(spec(), Observation(deployments=[deployment(ready=1)], pods=[pod(ready=True), pod()]),
                       None, T0)
    assert conds(starting)["Ready"] == ("False", "ReplicasNotReady")
    assert conds(starting)["Progressing"] == ("True", "ReplicasStarting")
    assert "1/2 replicas" in starting["conditions"][0]["message"]
    stale = status_of(spec(), Observation(deployments=[deployment(generation=2, observed=1)]), None, T0)
    assert conds(stale)["Ready"][0] == "False"


def test_unschedulable_pods_report_the_schedulers_reason():
    status = status_of(spec(), Observation(deployments=[deployment(ready=0)], pods=[pod(**UNSCHEDULABLE)] * 2),
                     None, T0)
    ready, degraded = status["conditions"][0], status["conditions"][2]
    assert (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert degraded["message"] == (f"2 of 2 pods of {name(3)}: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
                                   " (no node has 1 free nvidia.com/gpu: add GPU nodes or lower spec.replicas)")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "Unschedulable", degraded["message"])
    assert status["unschedulableReplicas"] == 2


def test_model_pull_failure_outranks_scheduling_and_names_the_container():
    refused = {"initContainerStatuses": [{"name": "model-puller", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                          "lastState": {"terminated": {"exitCode": 3, "message":
                                                                       "copying\nsha256 mismatch: 1/model.onnx"}}}]}
    status = status_of(spec(), Observation(deployments=[deployment(ready=0)],
                                         pods=[pod(**UNSCHEDULABLE), pod(**refused)]), None, T0)
    degraded = status["conditions"][2]
    assert degraded["reason"] == "ModelPullFailed"
    assert degraded["message"] == f"1 of 2 pods of {name(3)}: container model-puller exited 3: sha256 mismatch: 1/model.onnx"


def test_image_and_crash_troubles():
    image = {"containerStatuses": [{"name": "tritonserver", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}
    assert pod(**image)["trouble"] == ["ImagePullFailed", "container tritonserver: Back-off pulling image"]
    crash = {"containerStatuses": [{"name": "tritonserver", "state": {"terminated": {"exitCode": 1,
                                                                                    "reason": "Error"}}}]}
    assert pod(**crash)["trouble"] == ["ContainerFailing", "container tritonserver exited 1: Error"]
    assert pod(ready=True)["trouble"] is None


def test_pods_of_other_versions_or_terminating_do_not_degrade():
    old = pod(version=2, **UNSCHEDULABLE)
    status = status_of(spec(), Observation(deployments=[deployment()], pods=[old]), None, T0)
    assert conds(status)["Degraded"] == ("False", "Healthy")


def test_progress_deadline():
    status = status_of(spec(), Observation(deployments=[deployment(ready=1, deadline=True)]), None, T0)
    assert conds(status)["Degraded"] == ("True", "ProgressDeadlineExceeded")
    assert conds(status)["Progressing"] == ("False", "ProgressDeadlineExceeded")


def test_scaled_to_zero_is_not_ready_but_complete():
    status = status_of(spec(replicas=0), Observation(deployments=[deployment(ready=0, replicas=0)]), None, T0)
    assert conds(status)["Ready"] == ("False", "ScaledToZero")
    assert conds(status)["Progressing"] == ("False", "Complete")


def test_old_version_keeps_serving_while_the_new_one_starts():
    v3 = status_of(spec(), Observation(deployments=[deployment()]), None, T0)
    status = status_of(spec(version=4), Observation(deployments=[deployment(version=3),
                                                                 deployment(version=4, ready=0, replicas=1)]), v3, T1)
    assert conds(status)["Ready"] == ("True", "Available")
    assert conds(status)["Progressing"] == ("True", "RolloutInProgress")
    assert f"canary {spec(version=4).revision} at 0%" in status["conditions"][1]["message"]
    assert status["canary"]["deployment"] == name(4) and status["canary"]["weight"] == 0
    assert status["replicas"] == 2  # the canary's surge pod is not reported to an HPA (scale subresource)


def test_reconcile_problems_are_degraded():
    status = status_of(spec(), Observation(deployments=[deployment()], problems=[
        Problem("ChildConflict", "Service chat already exists and is not controlled by this LLMService")]),
        None, T0)
    assert conds(status)["Degraded"] == ("True", "ChildConflict")


def test_transition_time_moves_only_when_status_flips():
    first = status_of(spec(), Observation(deployments=[deployment(ready=1)]), None, T0)
    again = status_of(spec(), Observation(deployments=[deployment(ready=1)]), first, T1)
    assert again == first  # nothing changed: an identical status, hence no write
    ready = status_of(spec(), Observation(deployments=[deployment()]), first, T1)
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0}


def test_events_on_meaningful_transitions_only():
    starting = status_of(spec(), Observation(deployments=[deployment(ready=0)]), None, T0)
    assert transition_events(None, starting) == []
    ready = status_of(spec(), Observation(deployments=[deployment()]), starting, T1)
    assert transition_events(starting, ready) == [("Normal", "Ready", f"2/2 replicas of tiny {spec().revision} ready")]
    assert transition_events(ready, ready) == []
    stuck = status_of(spec(), Observation(deployments=[deployment(ready=1)], pods=[pod(**UNSCHEDULABLE)]), ready, T1)
    kinds = [(t, r) for t, r, _ in transition_events(ready, stuck)]
    assert kinds == [("Warning", "NotReady"), ("Warning", "Unschedulable")]


def test_invalid_spec_status_keeps_other_fields():
    status = invalid({"stable": {"version": 1}}, 3, "bad", T0)
    assert status["stable"] == {"version": 1}
    assert conds(status)["Degraded"] == ("True", "InvalidSpec")


def test_condition_merge_drops_unknown_types_and_keeps_order():
    merged = conditions.merge([{"type": "Old", "status": "True"}], [Condition("B", "True", "R"),
                                                                     Condition("A", "False", "S", "m")],
                              generation=1, now=T0)
    assert [c["type"] for c in merged] == ["B", "A"]
    assert conditions.is_true(merged, "B") and not conditions.is_true(merged, "A")
    assert conditions.find(merged, "Old") is None


def test_a_written_deployment_does_not_flap_ready():
    """The apply response of a Deployment whose replicas just changed still carries the status of
    the previous generation: a Ready service stays Ready (no NotReady/Ready Events pair)."""
    ready = status_of(spec(), Observation(deployments=[deployment()]), None, T0)
    assert conds(ready)["Ready"][0] == "True"
    written = deployment(generation=2, observed=1)
    status = status_of(spec(), Observation(deployments=[written]), ready, T1)
    assert conds(status)["Ready"][0] == "True"
    assert transition_events(ready, status) == []
    # Without a Ready verdict to keep, an unsettled Deployment is not Ready.
    assert conds(status_of(spec(), Observation(deployments=[written]), None, T1))["Ready"][0] == "False"
