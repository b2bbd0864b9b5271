"""One level-based reconcile of one LLMService: render, apply the differences, derive status.

Input is the LLMService and its children as last observed (the operator's watch indexes); nothing
here depends on which event triggered the run, so running it twice in a row is harmless and the
second run writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import apply as applier
from . import autoscaling
from . import status as st
from .kube import ApiError, KubeClient, now_rfc3339, object_path
from .render import Images, desired_children
from .spec import API_VERSION, KIND, Spec

log = logging.getLogger("llmserve.controller")


@dataclass
class Children:
    """Observed children of one LLMService, as the watch indexes hold them."""

    deployments: list[dict] = field(default_factory=list)
    services: list[dict] = field(default_factory=list)
    disruption_budgets: list[dict] = field(default_factory=list)
    autoscalers: list[dict] = field(default_factory=list)  # HorizontalPodAutoscalers
    pods: list[dict] = field(default_factory=list)  # status.pod_summary() of each


class Recorder:
    """Posts Kubernetes Events about an LLMService (what the operator did, and why)."""

    def __init__(self, client: KubeClient, component: str = "llmserve-operator", instance: str = ""):
        self.client, self.component, self.instance = client, component, instance

    async def post(self, parent: dict, type_: str, reason: str, message: str) -> None:
        meta, now = parent["metadata"], now_rfc3339()
        log.log(logging.WARNING if type_ == "Warning" else logging.INFO, "%s/%s: %s: %s",
                meta["namespace"], meta["name"], reason, message)
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": self.component},
            "reportingComponent": self.component, "reportingInstance": self.instance or self.component,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self.client.create(event)
        except ApiError as exc:  # an Event is best effort; losing one must not fail the reconcile
            log.warning("cannot post event %s/%s: %s", reason, meta["name"], exc)


async def reconcile(parent: dict, children: Children, client: KubeClient, images: Images,
                    recorder: Recorder, prometheus_url: str = "") -> None:
    """Converge one LLMService. Raises ApiError when the API server fails a request."""
    meta = parent["metadata"]
    if meta.get("deletionTimestamp"):
        return  # the garbage collector removes the children through their ownerReferences
    try:
        spec = Spec.from_object(parent)
    except ValueError as exc:
        await _write_status(client, recorder, parent,
                            st.invalid(parent.get("status"), meta.get("generation", 1), str(exc), now_rfc3339()))
        return

    observed = {(o["kind"], o["metadata"]["name"]): o for o in
                children.deployments + children.services + children.disruption_budgets + children.autoscalers}
    problems, current = [], {}
    wanted = desired_children(spec, images)
    try:
        scaler = autoscaling.autoscaler(spec, prometheus_url)
    except autoscaling.AutoscalerUnavailable as exc:
        scaler = None
        problems.append(st.Problem("AutoscalerUnavailable", str(exc)))
    wanted += [scaler] if scaler else []
    for desired in wanted:
        key = (desired["kind"], desired["metadata"]["name"])
        outcome = await applier.ensure(client, desired, observed.get(key), spec.uid)
        if outcome.action in (applier.CONFLICT, applier.INVALID):
            reason = "ChildConflict" if outcome.action == applier.CONFLICT else "ApplyFailed"
            if desired is scaler and outcome.action == applier.INVALID:
                reason, outcome.message = "AutoscalerRejected", autoscaling.rejection(spec, outcome.message)
            problems.append(st.Problem(reason, outcome.message))
            continue
        current[key] = outcome.obj
        if outcome.action == applier.CREATED:
            await recorder.post(parent, "Normal", "Created", f"created {applier.describe(desired)}")
        elif outcome.action == applier.UPDATED:
            await recorder.post(parent, "Normal", "Updated",
                                f"updated {applier.describe(desired)}: {', '.join(outcome.changed[:5])}")

    await _prune_autoscalers(client, recorder, parent, spec, children.autoscalers,
                             {(d["kind"], d["metadata"]["name"]) for d in wanted})

    ours = [d for d in children.deployments if applier.controlled_by(d, spec.uid) and
            ("Deployment", d["metadata"]["name"]) not in current]
    deployments = [o for (kind, _), o in current.items() if kind == "Deployment"] + ours
    seen = st.Observation(deployments=deployments, pods=children.pods, problems=problems,
                          autoscaler=current.get(("HorizontalPodAutoscaler", spec.name)))
    status = st.compute(spec, seen, parent.get("status"), now_rfc3339())

    # Without a canary (issue 6), an older version keeps serving until the new one is Ready.
    if ours and st.cond.is_true(status["conditions"], st.READY):
        for old in ours:
            await client.delete(old)
            await recorder.post(parent, "Normal", "Deleted",
                                f"deleted {applier.describe(old)}: superseded by v{spec.version}")
        seen.deployments = [o for (kind, _), o in current.items() if kind == "Deployment"]
        status = st.compute(spec, seen, parent.get("status"), now_rfc3339())

    await _write_status(client, recorder, parent, status)


async def _prune_autoscalers(client: KubeClient, recorder: Recorder, parent: dict, spec: Spec,
                             hpas: list[dict], wanted: set[tuple[str, str]]) -> None:
    """Delete the autoscaler the spec no longer asks for (autoscaling removed, or the other
    engine chosen): two autoscalers on one scale subresource would fight. One the API server just
    refused to update is still wanted, and keeps scaling with its last accepted settings.

    HPAs are watched. ScaledObjects are not (KEDA may not be installed, and a watch on a missing
    resource fails), so `status.autoscaling.engine` remembers that one was created.
    """
    stale = [h for h in hpas if applier.controlled_by(h, spec.uid)
             and (h["kind"], h["metadata"]["name"]) not in wanted]
    engine = ((parent.get("status") or {}).get("autoscaling") or {}).get("engine")
    if engine == autoscaling.KEDA and ("ScaledObject", spec.name) not in wanted:
        found = await client.get(object_path({"apiVersion": autoscaling.KEDA_API_VERSION, "kind": "ScaledObject",
                                              "metadata": {"name": spec.name, "namespace": spec.namespace}}))
        if found and applier.controlled_by(found, spec.uid):
            stale.append(found)
    for obj in stale:
        await client.delete(obj)
        await recorder.post(parent, "Normal", "Deleted",
                            f"deleted {applier.describe(obj)}: spec.autoscaling no longer asks for it")


async def _write_status(client: KubeClient, recorder: Recorder, parent: dict, status: dict) -> None:
    """Write the status only when it differs from what the object holds, then post the Events
    its condition changes call for."""
    previous = parent.get("status") or {}
    if status == previous:
        return
    meta = parent["metadata"]
    await client.apply({"apiVersion": API_VERSION, "kind": KIND,
                        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                        "status": status}, subresource="status", replacing=parent)
    for type_, reason, message in st.transition_events(previous, status):
        await recorder.post(parent, type_, reason, message)

