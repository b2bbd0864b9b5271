"""LLMService status derived from what was observed: pure functions, no I/O, clock passed in.

Conditions (all three always present, metav1.Condition shape):
- Ready: the requested replicas are ready to serve (stable pods, plus the canary's during a
  rollout).
- Progressing: the operator is still moving the children toward the spec (a rollout: its phase,
  step, weight and last analysis).
- Degraded: something needs a person: an aborted rollout (with the measured values), pods that
  cannot be scheduled (the scheduler's own message), a model that fails to pull or load, an image
  that cannot be pulled, a child name owned by someone else, an API error. The reason says which,
  the message says why.

Per track (`stable`, `canary`), `model` is what the model puller of a ready pod reported it
installed: version, manifest sha256, lineage (llmserve.operator.puller_report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import autoscaling, lws
from . import conditions as cond
from .conditions import FALSE, TRUE, Condition
from .puller_report import message_of, parse, served_model
from .render import PREDICTOR_PORT
from .rollout import Plan
from .lws import group_of
from .spec import LABEL_REVISION, LABEL_VERSION, Spec, deployment_name, pod_selector

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"

_IMAGE_WAITING = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})
_FAILING_WAITING = frozenset({"CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError",
                              "RunContainerError"})
# When pods have several troubles, the one a person must fix first.
_SEVERITY = ("ModelPullFailed", "ImagePullFailed", "ContainerFailing", "Unschedulable")


@dataclass(frozen=True)
class Problem:
    """Something the reconcile itself could not do (conflicting child, API error)."""

    reason: str
    message: str


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def _container_trouble(statuses: list[dict] | None, init: bool) -> tuple[str, str] | None:
    """Why a container cannot run: an image that cannot be pulled, or a process that keeps failing
    (for the init container: the model puller refusing the artifact)."""
    for cs in statuses or []:
        state, name = cs.get("state") or {}, cs.get("name")
        waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
        if waiting.get("reason") in _IMAGE_WAITING:
            return "ImagePullFailed", f"container {name}: {waiting.get('message') or waiting['reason']}"
        if terminated.get("exitCode"):
            failure = terminated
        elif waiting.get("reason") in _FAILING_WAITING:
            failure = (cs.get("lastState") or {}).get("terminated") or waiting
        else:
            continue
        detail = _last_line(failure.get("message")) or failure.get("reason") or waiting.get("reason")
        code = failure.get("exitCode")
        text = f"container {name} exited {code}: {detail}" if code else f"container {name}: {detail}"
        return ("ModelPullFailed" if init else "ContainerFailing"), text
    return None


def pod_summary(pod: dict) -> dict:
    """What the status needs from a pod (kept in the operator's index instead of the whole pod)."""
    meta, status = pod["metadata"], pod.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    trouble = None
    scheduled = conds.get("PodScheduled") or {}
    if scheduled.get("status") == FALSE and scheduled.get("reason") == "Unschedulable":
        trouble = ("Unschedulable", scheduled.get("message") or "no node fits the pod")
    trouble = (_container_trouble(status.get("initContainerStatuses"), init=True)
               or _container_trouble(status.get("containerStatuses"), init=False) or trouble)
    return {
        "name": meta["name"],
        "uid": meta.get("uid"),
        "version": (meta.get("labels") or {}).get(LABEL_VERSION),
        "revision": (meta.get("labels") or {}).get(LABEL_REVISION),
        "ready": (conds.get("Ready") or {}).get("status") == TRUE,
        "deleting": bool(meta.get("deletionTimestamp")),
        "trouble": list(trouble) if trouble else None,
        # `<LeaderWorkerSet>/<group index>` of a multi-node replica's member, else "".
        "group": group_of(meta.get("labels") or {}),
        # What its model puller installed (puller_report), published as status.<track>.model.
        "model": parse(message_of(pod)),
    }


def workload_counts(obj: dict | None, pods: list[dict]) -> dict:
    """Replica counts of a revision's Deployment, or of its LeaderWorkerSet in groups: a group is
    ready only while every member is (the controller's count, and never more groups than the
    pods show complete, so a group missing a member is not Ready even before the controller
    notices)."""
    if obj is None or obj.get("kind") != lws.KIND:
        return _deployment_counts(obj)
    counts = lws.counts(obj)
    size = ((obj.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("size", 1)
    complete = lws.complete_groups(pods, obj["metadata"]["name"], size)
    counts["ready"] = counts["available"] = min(counts["ready"], complete)
    return counts


def _deployment_counts(dep: dict | None) -> dict:
    status = (dep or {}).get("status") or {}
    meta = (dep or {}).get("metadata") or {}
    progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {})
    return {
        "replicas": status.get("replicas", 0),
        "ready": status.get("readyReplicas", 0),
        "updated": status.get("updatedReplicas", 0),
        "available": status.get("availableReplicas", 0),
        "settled": dep is not None and status.get("observedGeneration", 0) >= meta.get("generation", 1),
        "deadline": progressing.get("reason") == "ProgressDeadlineExceeded",
    }


def _pod_trouble(spec: Spec, pods: list[dict], revisions: set[str]) -> tuple[str, str] | None:
    """The most severe trouble among the live pods of the served revisions (stable, and canary
    during a rollout), with how many pods of that revision share it."""
    live = [p for p in pods if p["revision"] in revisions and not p["deleting"]]
    troubled = [p for p in live if p["trouble"]]
    if not troubled:
        return None
    reason = min((p["trouble"][0] for p in troubled), key=_SEVERITY.index)
    revision = next(p["revision"] for p in troubled if p["trouble"][0] == reason)
    same = [p["trouble"] for p in troubled if p["trouble"][0] == reason and p["revision"] == revision]
    total = sum(1 for p in live if p["revision"] == revision)
    message = f"{len(same)} of {total} pods of {deployment_name(spec.name, revision)}: {same[0][1]}"
    if spec.parallelism.multi_node and (groups := sorted({p["group"] for p in troubled
                                                         if p["trouble"][0] == reason and p["group"]})):
        message += (f" (incomplete groups {', '.join(groups)}: a replica needs all its {spec.parallelism.nodes} "
                    "pods, and none of them serves until every one runs)")
    if reason == "Unschedulable" and f"Insufficient {spec.gpu_resource}" in same[0][1]:
        # The common case on GPU clusters (an autoscaler asking for more than the cluster has):
        # say what a person can do about it.
        bound = "spec.autoscaling.maxReplicas" if spec.autoscaling else "spec.replicas"
        message += f" (no node has {spec.gpus} free {spec.gpu_resource}: add GPU nodes or lower {bound})"
    return reason, message


def unschedulable(pods: list[dict]) -> int:
    """Replicas of any version the scheduler could not place: pods, or for multi-node replicas the
    groups with a member it could not place."""
    stuck = [p for p in pods if not p["deleting"] and p["trouble"] and p["trouble"][0] == "Unschedulable"]
    return len({p["group"] for p in stuck if p.get("group")}) + sum(1 for p in stuck if not p.get("group"))


@dataclass
class Observation:
    """The children of one LLMService as last seen (after this reconcile's own writes)."""

    deployments: list[dict] = field(default_factory=list)
    pods: list[dict] = field(default_factory=list)  # pod_summary() of each pod
    problems: list[Problem] = field(default_factory=list)
    autoscaler: dict | None = None  # the HorizontalPodAutoscaler, when spec.autoscaling has one


def compute(spec: Spec, seen: Observation, previous: dict | None, now: str, plan: Plan) -> dict:
    """The full status block the LLMService should have, given the rollout `plan` that was applied."""
    by_name = {d["metadata"]["name"]: d for d in seen.deployments}
    stable_name = deployment_name(spec.name, plan.stable.name)
    current = by_name.get(stable_name)
    counts = workload_counts(current, seen.pods)
    serving = min(counts["updated"], counts["ready"], counts["available"])
    revisions = {plan.stable.name}
    if plan.canary is not None:
        canary_counts = workload_counts(by_name.get(deployment_name(spec.name, plan.canary.name)), seen.pods)
        revisions.add(plan.canary.name)
        serving += min(canary_counts["updated"], canary_counts["ready"], canary_counts["available"])
    want = spec.replicas
    ready = current is not None and counts["settled"] and want > 0 and serving >= autoscaling.ready_floor(spec)
    # A Deployment just written (replicas moved by the autoscaler or a rollout step) reports the
    # status of its previous generation until its controller catches up: that says nothing new,
    # so a Ready service stays Ready rather than flapping (and posting NotReady) on every write.
    held = cond.find((previous or {}).get("conditions"), READY) if current is not None and not counts["settled"] \
        and want > 0 and cond.is_true((previous or {}).get("conditions"), READY) else None
    trouble = _pod_trouble(spec, seen.pods, revisions)
    scaling, scaling_trouble = autoscaling.observe(spec, seen.autoscaler)
    what = f"{spec.model} {plan.stable.name}" + (f" and canary {plan.canary.name}" if plan.canary else "")

    if seen.problems:
        degraded = Condition(DEGRADED, TRUE, seen.problems[0].reason, "; ".join(p.message for p in seen.problems))
    elif plan.degraded:
        degraded = Condition(DEGRADED, TRUE, *plan.degraded)
    elif trouble:
        degraded = Condition(DEGRADED, TRUE, *trouble)
    elif counts["deadline"] and not ready:
        degraded = Condition(DEGRADED, TRUE, "ProgressDeadlineExceeded",
                             f"{stable_name} made no progress within its deadline")
    elif scaling_trouble:
        degraded = Condition(DEGRADED, TRUE, *scaling_trouble)
    else:
        degraded = Condition(DEGRADED, FALSE, "Healthy", "")

    if held and degraded.status != TRUE:
        ready, readiness = True, Condition(READY, TRUE, held.get("reason", "Available"), held.get("message", ""))
    elif ready:
        readiness = Condition(READY, TRUE, "Available", f"{serving}/{want} replicas of {what} ready")
    elif want == 0:
        readiness = Condition(READY, FALSE, "ScaledToZero", f"{what} has 0 replicas")
    elif degraded.status == TRUE:
        readiness = Condition(READY, FALSE, degraded.reason, degraded.message)
    elif current is None:
        readiness = Condition(READY, FALSE, "Creating", f"creating {stable_name}")
    else:
        readiness = Condition(READY, FALSE, "ReplicasNotReady", f"{serving}/{want} replicas of {what} ready")

    if plan.progressing:
        progressing = Condition(PROGRESSING, *plan.progressing)
    elif counts["deadline"] and not ready:
        progressing = Condition(PROGRESSING, FALSE, "ProgressDeadlineExceeded", degraded.message)
    elif want > 0 and (not ready or counts["ready"] < want):  # the latter: scaling up past the floor
        progressing = Condition(PROGRESSING, TRUE, "ReplicasStarting", readiness.message)
    else:
        progressing = Condition(PROGRESSING, FALSE, "Complete", f"{what} is rolled out")

    out = {
        "observedGeneration": spec.generation,
        "conditions": cond.merge((previous or {}).get("conditions"), [readiness, progressing, degraded],
                                 generation=spec.generation, now=now),
        "stable": _with_model({**plan.status["stable"], "deployment": stable_name}, seen.pods, previous),
        "rollout": plan.status["rollout"],
        "history": plan.status["history"],
        # What the scale subresource reports to an HPA: never the rollout's surge pods (an HPA
        # at its target would otherwise adopt them as the new spec.replicas, step after step).
        "replicas": min(spec.replicas, sum(workload_counts(d, seen.pods)["replicas"] for d in seen.deployments)),
        # For the HPA's pod count (scale subresource): one pod per replica, so never a
        # multi-node replica's workers. `notin`, not `!=`: clients convert the string to a
        # LabelSelector, which has no `!=`.
        "selector": pod_selector(spec.name) + (f",{lws.LABEL_ROLE} notin ({lws.WORKER})"
                                               if spec.parallelism.multi_node else ""),
        "endpoint": f"http://{spec.name}.{spec.namespace}.svc:{PREDICTOR_PORT}",
        "unschedulableReplicas": unschedulable(seen.pods),
    }
    if plan.canary is not None:
        out["canary"] = _with_model({**plan.status["canary"], "deployment": deployment_name(spec.name, plan.canary.name)},
                                    seen.pods, previous)
    if scaling:
        out["autoscaling"] = scaling
    return out


def _with_model(block: dict, pods: list[dict], previous: dict | None) -> dict:
    """A track's status block with what its pods' model puller installed, once one has said so."""
    model = served_model(pods, block["revision"], block["version"], previous)
    return {**block, "model": model} if model else block


def invalid(previous: dict | None, generation: int, message: str, now: str) -> dict:
    """Status of an object the operator cannot render (what CEL could not rule out)."""
    return {
        **{k: v for k, v in (previous or {}).items() if k != "conditions"},
        "observedGeneration": generation,
        "conditions": cond.merge((previous or {}).get("conditions"), [
            Condition(READY, FALSE, "InvalidSpec", message),
            Condition(PROGRESSING, FALSE, "InvalidSpec", message),
            Condition(DEGRADED, TRUE, "InvalidSpec", message),
        ], generation=generation, now=now),
    }


def transition_events(previous: dict | None, new: dict) -> list[tuple[str, str, str]]:
    """(type, reason, message) Events worth posting because a condition changed meaning."""
    before, events = (previous or {}).get("conditions"), []
    ready_now, ready_was = cond.find(new["conditions"], READY), cond.find(before, READY)
    if ready_now["status"] == TRUE and (not ready_was or ready_was.get("status") != TRUE):
        events.append(("Normal", "Ready", ready_now["message"]))
    elif ready_now["status"] != TRUE and ready_was and ready_was.get("status") == TRUE:
        events.append(("Warning", "NotReady", ready_now["message"]))
    deg_now, deg_was = cond.find(new["conditions"], DEGRADED), cond.find(before, DEGRADED)
    if deg_now["status"] == TRUE and (not deg_was or (deg_was.get("status"), deg_was.get("reason"))
                                      != (TRUE, deg_now["reason"])):
        events.append(("Warning", deg_now["reason"], deg_now["message"]))
    return events
