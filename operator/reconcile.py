"""One level-based reconcile of one LLMService: observe -> decide -> act.

- `observe()` gathers what the indexes cannot hold: an analysis verdict when one is due, whether
  the cluster serves HTTPRoutes, and the children of kinds that are not watched (HTTPRoute,
  ScaledObject: their APIs may not be installed).
- `decide()` is pure: from the LLMService, its observed children and that observation it plans
  the rollout and returns the children to apply, the owned children to prune (one path for every
  kind: a revision no longer served, an autoscaler no longer asked for, a route no longer used)
  and the problems to report.
- `act()` applies (independent children concurrently, the route after the Services it points
  at), prunes, posts one Event per kind of action, then writes the status derived from what it saw
  and wrote, conditional on the resourceVersion it was computed from: a status computed from a
  stale object is refused (409) and the run repeated, never written over a newer one.

Input is the LLMService and its children as last observed (the operator's watch indexes, or what
it wrote itself if they lag, `recent`); nothing depends on which event triggered the run, so
running it twice in a row is harmless and the second run writes nothing. The rollout's whole state
is in the status (llmserve.operator.rollout), so a restarted operator carries on where the last one
stopped; time-driven steps (a pause ending, an analysis due) are not events, so the result says
when to run again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import analysis, autoscaling, rollout, traffic
from . import apply as applier
from . import lws
from . import status as st
from .kube import ApiError, KubeClient, now_rfc3339, object_path
from .render import Images, Tracks, desired_children
from .spec import API_VERSION, CANARY, KIND, LABEL_REVISION, STABLE, Spec, track_service_name

log = logging.getLogger("llmserve.operator")

# Kinds the operator does not watch: read when the spec or the status says one may exist.
UNWATCHED = frozenset({"HTTPRoute", "ScaledObject"})
# Kinds a service stops needing (a revision, an autoscaler, a route). Its Services and PDB have
# fixed names and live as long as it does (the garbage collector removes them, RBAC: no delete).
PRUNABLE = frozenset({"Deployment", "LeaderWorkerSet", "HorizontalPodAutoscaler", "ScaledObject", "HTTPRoute"})
# What runs a revision's replicas: one-pod replicas, or groups of a multi-node model.
WORKLOADS = frozenset({"Deployment", "LeaderWorkerSet"})


@dataclass
class Children:
    """Observed children of one LLMService, as the watch indexes hold them."""

    deployments: list[dict] = field(default_factory=list)
    leader_worker_sets: list[dict] = field(default_factory=list)  # multi-node revisions
    services: list[dict] = field(default_factory=list)
    disruption_budgets: list[dict] = field(default_factory=list)
    autoscalers: list[dict] = field(default_factory=list)  # HorizontalPodAutoscalers
    pods: list[dict] = field(default_factory=list)  # status.pod_summary() of each


@dataclass
class Result:
    """How a run ended: when to run again (None: on the next event), and whether it failed (the
    engine backs off, at least `retry_after` seconds)."""

    requeue_after: float | None = None
    failed: bool = False
    retry_after: float | None = None


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


# ------------------------------------------------------------------------------------- observe

@dataclass
class Observation:
    """Everything `decide()` needs beyond the LLMService and its watched children."""

    now: datetime
    verdict: analysis.Verdict | None = None
    gateway: bool = False  # the cluster serves HTTPRoutes (only asked when spec has a gatewayRef)
    unwatched: list[dict] = field(default_factory=list)  # HTTPRoute / ScaledObject that exist


def _unwatched_path(kind: str, spec: Spec) -> str:
    api_version = traffic.HTTPROUTE_API_VERSION if kind == "HTTPRoute" else autoscaling.KEDA_API_VERSION
    return object_path({"apiVersion": api_version, "kind": kind,
                        "metadata": {"name": spec.name, "namespace": spec.namespace}})


async def observe(spec: Spec, previous: dict, client: KubeClient, prometheus_url: str,
                  gateway: GatewayDiscovery, prometheus_allowed: tuple[str, ...] = ()) -> Observation:
    now = datetime.now(timezone.utc)
    seen = Observation(now)
    stable = (previous.get("stable") or {}).get("revision") or spec.revision
    if canary := rollout.analysis_due(spec.rollout, spec.serving, previous, now):
        criteria = spec.rollout.analysis
        seen.verdict = await analysis.analyze(prometheus_url, criteria, allowed=prometheus_allowed,
                                              namespace=spec.namespace, service=spec.name, model=spec.model,
                                              canary=canary, stable=stable)
    if spec.gateway_ref:
        seen.gateway = await gateway.available(client)
    kinds = set()
    if seen.gateway or (previous.get("traffic") or {}).get("route"):
        kinds.add("HTTPRoute")
    if (spec.autoscaling and spec.autoscaling.engine == autoscaling.KEDA) or \
            (previous.get("autoscaling") or {}).get("engine") == autoscaling.KEDA:
        kinds.add("ScaledObject")
    for kind in sorted(kinds):
        try:
            if found := await client.get(_unwatched_path(kind, spec)):
                seen.unwatched.append(found)
        except ApiError as exc:
            if not exc.refused:  # an API that is not installed answers 404 on its group: nothing there
                raise
    return seen


# -------------------------------------------------------------------------------------- decide

class StableSpecError(ValueError):
    """The stable revision recorded in the status cannot be rendered under the current spec."""


@dataclass
class Decision:
    plan: rollout.Plan
    waves: list[list[dict]]  # children to apply; each wave after the previous one
    prune: list[tuple[dict, str]]  # owned children no longer wanted, and why
    problems: list[st.Problem] = field(default_factory=list)
    scaler: dict | None = None  # the autoscaler in `waves`, if any (its rejection reads differently)
    gateway: bool = False


def _ready_by_revision(workloads: list[dict], pods: list[dict]) -> dict[str, int]:
    return {w["metadata"].get("labels", {}).get(LABEL_REVISION): st.workload_counts(w, pods)["ready"]
            for w in workloads}


def decide(parent: dict, spec: Spec, children: Children, seen: Observation, images: Images,
           prometheus_url: str = "") -> Decision:
    """What the LLMService's children should be, and which owned ones should go. Pure. Raises
    StableSpecError when the stable revision cannot be rendered."""
    previous = parent.get("status") or {}
    ours = [o for o in children.deployments + children.leader_worker_sets + children.services
            + children.disruption_budgets + children.autoscalers + seen.unwatched if applier.controlled_by(o, spec.uid)]
    ready = _ready_by_revision([o for o in ours if o["kind"] in WORKLOADS], children.pods)
    stable = (previous.get("stable") or {}).get("revision") or spec.revision
    observed = rollout.Observed(ready.get(stable, 0), ready.get(spec.revision, 0) if spec.revision != stable else 0)
    problems = []
    if spec.gateway_ref and not seen.gateway:
        problems.append(st.Problem("GatewayAPIMissing", "spec.rollout.traffic.gatewayRef is set but the cluster "
                                   "serves no gateway.networking.k8s.io/v1 HTTPRoute; splitting traffic by "
                                   "replica ratio (install the Gateway API CRDs)"))
    plan = rollout.plan(spec.rollout, spec.serving, spec.replicas, previous, observed, seen.now, verdict=seen.verdict,
                        action=(parent["metadata"].get("annotations") or {}).get(rollout.ACTION_ANNOTATION),
                        gateway=seen.gateway)
    # The LLMService as its stable revision serves it: the shared children carry its labels.
    try:
        base = spec if plan.stable.name == spec.revision else Spec.from_object(parent, plan.stable.spec)
    except ValueError as exc:
        raise StableSpecError(f"the stable revision {plan.stable.name} cannot be rendered: {exc}") from exc
    tracks = Tracks(base, plan.split.stable, spec if plan.canary else None, plan.split.canary)
    existing = {(o["kind"], o["metadata"]["name"]) for o in ours}
    first = [o for o in desired_children(base, images, tracks)
             if _protects_something(o, spec, plan, seen.gateway, existing)]
    try:
        scaler = autoscaling.autoscaler(spec, prometheus_url)
    except autoscaling.AutoscalerUnavailable as exc:
        scaler = None
        problems.append(st.Problem("AutoscalerUnavailable", str(exc)))
    first += [scaler] if scaler else []
    # After the Services: the route must never point at a Service that is not there.
    waves = [first, [traffic.http_route(base, spec.gateway_ref, plan.split, plan.stable.version)]] if seen.gateway \
        else [first]
    wanted = {(o["kind"], o["metadata"]["name"]) for wave in waves for o in wave}
    prune = [(o, _why_pruned(o, plan)) for o in ours
             if o["kind"] in PRUNABLE and (o["kind"], o["metadata"]["name"]) not in wanted]
    return Decision(plan, waves, prune, problems, scaler, seen.gateway)


def _protects_something(child: dict, spec: Spec, plan: rollout.Plan, gateway: bool,
                        existing: set[tuple[str, str]]) -> bool:
    """Whether a child earns its API requests (a fleet creates thousands): the track Services only
    once a rollout or a gateway route needs them (until then the entry Service selects the same
    pods, with the same ports; each Service costs a ClusterIP, which the API server allocates one
    at a time), the PodDisruptionBudget only once an eviction could take the last ready pod
    otherwise (more than one replica). One that exists is kept and kept right (they are never
    deleted: the garbage collector removes them with the service)."""
    key = (child["kind"], child["metadata"]["name"])
    if key in existing:
        return True
    if key in {("Service", track_service_name(spec.name, track)) for track in (STABLE, CANARY)}:
        return plan.canary is not None or gateway
    if child["kind"] == "PodDisruptionBudget":
        return max(spec.replicas, spec.autoscaling.max_replicas if spec.autoscaling else 0) > 1
    return True


def _why_pruned(obj: dict, plan: rollout.Plan) -> str:
    kind = obj["kind"]
    if kind in WORKLOADS:
        return f"its revision is no longer served (stable {plan.stable.name})"
    if kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        return "spec.autoscaling no longer asks for it"
    return "traffic is split by replica ratio now"  # HTTPRoute


# ----------------------------------------------------------------------------------------- act

async def reconcile(parent: dict, children: Children, client: KubeClient, images: Images,
                    recorder: Recorder, prometheus_url: str = "",
                    gateway: GatewayDiscovery | None = None, prometheus_allowed: tuple[str, ...] = ()) -> Result:
    """Converge one LLMService. Raises ApiError when the API server fails a request that is worth
    retrying (conflict, throttling, server error)."""
    meta = parent["metadata"]
    if meta.get("deletionTimestamp"):
        return Result()  # the garbage collector removes the children through their ownerReferences
    previous = parent.get("status") or {}
    try:
        spec = Spec.from_object(parent)
        seen = await observe(spec, previous, client, prometheus_url, gateway or GatewayDiscovery(),
                             prometheus_allowed)
        decision = decide(parent, spec, children, seen, images, prometheus_url)
    except ValueError as exc:  # also StableSpecError: the status says why, nothing is touched
        await _write_status(client, recorder, parent,
                            st.invalid(previous, meta.get("generation", 1), str(exc), now_rfc3339()))
        return Result()

    outcomes = []
    for wave in decision.waves:
        observed = {(o["kind"], o["metadata"]["name"]): o for o in
                    children.deployments + children.leader_worker_sets + children.services
                    + children.disruption_budgets + children.autoscalers
                    + seen.unwatched}
        outcomes += await asyncio.gather(*(applier.ensure(client, d, observed.get((d["kind"], d["metadata"]["name"])),
                                                          spec.uid, watched=d["kind"] not in UNWATCHED)
                                           for d in wave))
    wanted = [d for wave in decision.waves for d in wave]
    problems, current, created, updated = list(decision.problems), {}, [], []
    for desired, outcome in zip(wanted, outcomes):
        if outcome.action in (applier.CONFLICT, applier.INVALID):
            reason = "ChildConflict" if outcome.action == applier.CONFLICT else "ApplyFailed"
            if desired is decision.scaler and outcome.action == applier.INVALID:
                reason, outcome.message = "AutoscalerRejected", autoscaling.rejection(spec, outcome.message)
            elif desired["kind"] == lws.KIND and outcome.message.startswith(f"{lws.KIND} ") and " 404 " in outcome.message:
                reason, outcome.message = "LeaderWorkerSetMissing", (
                    f"spec.runtime.parallelism.nodes > 1 needs the LeaderWorkerSet API, which this cluster does "
                    f"not serve: install the LeaderWorkerSet controller, then restart the operator "
                    f"(docs/distributed.md#installing) ({outcome.message})")
            problems.append(st.Problem(reason, outcome.message))
            continue
        current[(desired["kind"], desired["metadata"]["name"])] = outcome.obj
        if outcome.action == applier.CREATED:
            created.append(applier.describe(desired))
        elif outcome.action == applier.UPDATED:
            updated.append(f"{applier.describe(desired)}: {', '.join(outcome.changed[:5])}")
    deleted = [f"{applier.describe(obj)}: {why}" for obj, why in decision.prune if await client.delete(obj)]
    # One Event per kind of action, not per child. The children of a brand-new service (no status
    # yet) are announced by its Ready transition instead: a "Created" Event then only tells of a
    # repair, and a new service costs one request less (the fleet's requests-per-service budget).
    if not previous:
        created = []
    for reason, done, sep in (("Created", created, ", "), ("Updated", updated, "; "), ("Deleted", deleted, "; ")):
        if done:
            await recorder.post(parent, "Normal", reason, f"{reason.lower()} {sep.join(done)}")

    plan = decision.plan
    observation = st.Observation(deployments=[o for (kind, _), o in current.items() if kind in WORKLOADS],
                                 pods=children.pods, problems=problems,
                                 autoscaler=current.get(("HorizontalPodAutoscaler", spec.name)))
    status = st.compute(spec, observation, previous, now_rfc3339(), plan)
    if decision.gateway:
        status["traffic"] = {"route": spec.name}
    if await _write_status(client, recorder, parent, status):
        for type_, reason, message in plan.events:
            await recorder.post(parent, type_, reason, message)
    # A child the API server refused or someone else holds: retried with backoff (no event would
    # announce that the cause went away: RBAC fixed, the foreign object deleted).
    blocked = len(problems) > len(decision.problems)
    return Result(plan.requeue_after, failed=blocked)


async def _write_status(client: KubeClient, recorder: Recorder, parent: dict, status: dict) -> bool:
    """Write the status only when it differs from what the object holds, and only over the very
    version it was computed from (409 otherwise: the run is repeated with the newer object), then
    post the Events its condition changes call for. Returns whether it wrote."""
    previous = parent.get("status") or {}
    if status == previous:
        return False
    meta = parent["metadata"]
    await client.apply({"apiVersion": API_VERSION, "kind": KIND,
                        "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                                     "resourceVersion": meta["resourceVersion"]},
                        "status": status}, subresource="status", replacing=parent)
    for type_, reason, message in st.transition_events(previous, status):
        await recorder.post(parent, type_, reason, message)
    return True
