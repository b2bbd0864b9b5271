"""One level-based reconcile of one LLMService: plan the rollout, render, apply the differences,
derive status.

Input is the LLMService and its children as last observed (the operator's watch indexes); nothing
here depends on which event triggered the run, so running it twice in a row is harmless and the
second run writes nothing. The rollout's whole state is in the status (llmserve.operator.rollout),
so a restarted operator carries on where the last one stopped; time-driven steps (a pause ending,
an analysis due) are not events, so `reconcile` returns when it wants to run again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import analysis, autoscaling, rollout, traffic
from . import apply as applier
from . import status as st
from .kube import ApiError, KubeClient, now_rfc3339, object_path
from .render import Images, Tracks, desired_children
from .spec import API_VERSION, KIND, LABEL_REVISION, Spec

log = logging.getLogger("llmserve.operator")


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


class GatewayDiscovery:
    """Whether the cluster serves Gateway API HTTPRoutes, asked at most once per `ttl` seconds
    (CRDs are installed rarely; a discovery request per reconcile would cost the fleet)."""

    def __init__(self, ttl: float = 60.0):
        self.ttl, self._value, self._checked = ttl, False, None

    async def available(self, client: KubeClient) -> bool:
        if self._checked is None or time.monotonic() - self._checked > self.ttl:
            self._value = traffic.gateway_api_installed(await client.get(traffic.HTTPROUTE_DISCOVERY_PATH))
            self._checked = time.monotonic()
        return self._value


async def reconcile(parent: dict, children: Children, client: KubeClient, images: Images,
                    recorder: Recorder, prometheus_url: str = "",
                    gateway: GatewayDiscovery | None = None) -> float | None:
    """Converge one LLMService. Returns the seconds after which it should run again although
    nothing changed (a rollout pause ends, an analysis is due), or None. Raises ApiError when the
    API server fails a request."""
    meta = parent["metadata"]
    if meta.get("deletionTimestamp"):
        return None  # the garbage collector removes the children through their ownerReferences
    try:
        spec = Spec.from_object(parent)
    except ValueError as exc:
        await _write_status(client, recorder, parent,
                            st.invalid(parent.get("status"), meta.get("generation", 1), str(exc), now_rfc3339()))
        return None

    problems, previous, now = [], parent.get("status") or {}, datetime.now(timezone.utc)
    ours = [d for d in children.deployments if applier.controlled_by(d, spec.uid)]
    ready = {d["metadata"].get("labels", {}).get(LABEL_REVISION): (d.get("status") or {}).get("readyReplicas", 0)
             for d in ours}
    stable = (previous.get("stable") or {}).get("revision") or spec.revision
    seen_ready = rollout.Observed(ready.get(stable, 0), ready.get(spec.revision, 0) if spec.revision != stable else 0)
    verdict = None
    if canary := rollout.analysis_due(spec.rollout, spec.serving, previous, now):
        criteria = spec.rollout.analysis
        verdict = await analysis.analyze(criteria.prometheus_url or prometheus_url, criteria, namespace=spec.namespace,
                                         service=spec.name, model=spec.model, canary=canary, stable=stable)
    by_gateway = False
    if spec.gateway_ref:
        by_gateway = await (gateway or GatewayDiscovery()).available(client)
        if not by_gateway:
            problems.append(st.Problem("GatewayAPIMissing", "spec.rollout.traffic.gatewayRef is set but the cluster "
                                       "serves no gateway.networking.k8s.io/v1 HTTPRoute; splitting traffic by "
                                       "replica ratio (install the Gateway API CRDs)"))
    plan = rollout.plan(spec.rollout, spec.serving, spec.replicas, previous, seen_ready, now, verdict=verdict,
                        action=(meta.get("annotations") or {}).get(rollout.ACTION_ANNOTATION), gateway=by_gateway)
    # The LLMService as its stable revision serves it: the shared children carry its labels.
    base = spec if plan.stable.name == spec.revision else Spec.from_object(parent, plan.stable.spec)
    tracks = Tracks(base, plan.split.stable, spec if plan.canary else None, plan.split.canary)

    observed = {(o["kind"], o["metadata"]["name"]): o for o in
                children.deployments + children.services + children.disruption_budgets + children.autoscalers}
    current = {}
    wanted = desired_children(base, images, tracks)
    if by_gateway:  # after the Services: the route must never point at a Service that is not there
        wanted.append(traffic.http_route(base, spec.gateway_ref, plan.split, plan.stable.version))
    try:
        scaler = autoscaling.autoscaler(spec, prometheus_url)
    except autoscaling.AutoscalerUnavailable as exc:
        scaler = None
        problems.append(st.Problem("AutoscalerUnavailable", str(exc)))
    wanted += [scaler] if scaler else []
    created, updated = [], []
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
            created.append(applier.describe(desired))
        elif outcome.action == applier.UPDATED:
            updated.append(f"{applier.describe(desired)}: {', '.join(outcome.changed[:5])}")
    # One Event per kind of action, not per child: a new service is one "Created" Event.
    if created:
        await recorder.post(parent, "Normal", "Created", f"created {', '.join(created)}")
    if updated:
        await recorder.post(parent, "Normal", "Updated", f"updated {'; '.join(updated)}")

    keys = {(d["kind"], d["metadata"]["name"]) for d in wanted}
    await _prune_autoscalers(client, recorder, parent, spec, children.autoscalers, keys)
    # Revisions the plan no longer serves: the old stable after a promotion, a superseded or
    # cancelled canary. The plan has already drained them of traffic and replicas.
    for old in ours:
        if ("Deployment", old["metadata"]["name"]) not in keys:
            await client.delete(old)
            await recorder.post(parent, "Normal", "Deleted", f"deleted {applier.describe(old)}: its revision "
                                f"is no longer served (stable {plan.stable.name})")
    route = (previous.get("traffic") or {}).get("route")
    if route and not by_gateway:
        await _delete_route(client, recorder, parent, spec, route)

    seen = st.Observation(deployments=[o for (kind, _), o in current.items() if kind == "Deployment"],
                          pods=children.pods, problems=problems,
                          autoscaler=current.get(("HorizontalPodAutoscaler", spec.name)))
    status = st.compute(spec, seen, previous, now_rfc3339(), plan)
    if by_gateway:
        status["traffic"] = {"route": spec.name}
    if await _write_status(client, recorder, parent, status):
        for type_, reason, message in plan.events:
            await recorder.post(parent, type_, reason, message)
    return plan.requeue_after


async def _delete_route(client: KubeClient, recorder: Recorder, parent: dict, spec: Spec, name: str) -> None:
    """Delete the HTTPRoute a gatewayRef no longer asks for (not watched: the Gateway API may not
    be installed, so `status.traffic.route` remembers that one was created)."""
    found = await client.get(object_path({"apiVersion": traffic.HTTPROUTE_API_VERSION, "kind": "HTTPRoute",
                                          "metadata": {"name": name, "namespace": spec.namespace}}))
    if found and applier.controlled_by(found, spec.uid):
        await client.delete(found)
        await recorder.post(parent, "Normal", "Deleted", f"deleted HTTPRoute {name}: traffic is split by replica "
                            "ratio now")


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


async def _write_status(client: KubeClient, recorder: Recorder, parent: dict, status: dict) -> bool:
    """Write the status only when it differs from what the object holds, then post the Events
    its condition changes call for. Returns whether it wrote."""
    previous = parent.get("status") or {}
    if status == previous:
        return False
    meta = parent["metadata"]
    await client.apply({"apiVersion": API_VERSION, "kind": KIND,
                        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                        "status": status}, subresource="status", replacing=parent)
    for type_, reason, message in st.transition_events(previous, status):
        await recorder.post(parent, type_, reason, message)
    return True

