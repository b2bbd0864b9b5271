"""kopf wiring: watch indexes and event handlers that only route events to the engine's reconcile.

- Indexes keep the LLMServices and their children in memory from kopf's watch streams, so a
  reconcile reads what it needs without a single API request. Every handler is a coroutine: kopf
  runs a plain function in a thread pool, a hop per watch event. Children are watched with a
  server-side label selector (`app.kubernetes.io/managed-by=llmserve`), so the operator never
  lists the cluster's other Deployments, Services or pods.
- Only `@on.event` handlers, for LLMServices, children and pods alike: each pokes the engine,
  which reconciles level-based from the indexes, retries failures itself (backoff with jitter)
  and wakes time-driven steps. kopf's change-detecting handlers (`on.create/update/resume`) would
  PATCH a bookkeeping annotation on the LLMService after every handled change: a write per event
  that also moves the resourceVersion our conditional status writes are based on. So the operator
  needs no `patch` (nor `get`) on llmservices, only `patch` on their status.
- No delete handler, daemon or timer: those would put a kopf finalizer on every LLMService.
  Deletion is the garbage collector's job (ownerReferences).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .engine import Engine, Key
from .kube import FIELD_MANAGER
from .lws import API_VERSION as LWS_API_VERSION, KIND as LWS_KIND, PLURAL as LWS_PLURAL
from .reconcile import Children
from .spec import GROUP, LABEL_MANAGED_BY, LABEL_SERVICE, MANAGED_SELECTOR, MANAGER, PLURAL, VERSION
from .status import pod_summary

registry = kopf.OperatorRegistry()
LWS_GROUP, LWS_VERSION = LWS_API_VERSION.split("/")

CHILD = {LABEL_MANAGED_BY: MANAGER, LABEL_SERVICE: kopf.PRESENT}
CHILD_RESOURCES = (("apps", "v1", "deployments"), ("v1", "services"),
                   ("policy", "v1", "poddisruptionbudgets"), ("autoscaling", "v2", "horizontalpodautoscalers"),
                   ("v1", "pods"), (LWS_GROUP, LWS_VERSION, LWS_PLURAL))


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf builds one per watch event (two deep copies of the object) to detect
    changes for change-detecting handlers, which this operator has none of. In a fleet burst that
    was half the operator's CPU, taken from the API server it shares the machine with."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> None:  # type: ignore[override]
        return None  # kopf then skips the diff (and the progress storage's copies) entirely

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        """Never called without change-detecting handlers; nothing to keep."""


def watch_settings(settings: kopf.OperatorSettings) -> None:
    """Server-side filtering of the child watches, no cluster scanning, only error Events from
    kopf, no diff base."""
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = MANAGED_SELECTOR
    settings.scanning.disabled = True  # no CRD/namespace watching: not needed, and not in our RBAC
    settings.posting.level = logging.ERROR  # kopf posts only errors as Events; ours say what we did
    settings.persistence.diffbase_storage = NoDiffBase()


# Annotations of no use to a reconcile that can be as large as the object itself.
_BULKY_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def _kept_managed_fields(entries: list[dict]) -> list[dict]:
    """What drift detection needs of managedFields: other managers' entries of the object itself
    (the list items they own are not ours to remove), and whether our own POST still owns the
    fields it created (`apply._adopt_created_fields`), without its field set."""
    kept = []
    for entry in entries or []:
        if entry.get("subresource"):
            continue
        if entry.get("manager") != FIELD_MANAGER:
            kept.append(entry)
        elif entry.get("operation") == "Update":
            kept.append({k: v for k, v in entry.items() if k != "fieldsV1"})
    return kept


def stored(body: kopf.Body, drift: bool = True) -> dict:
    """What the indexes keep of an object: all but bulky annotations and the managedFields drift
    detection does not need (`drift=False`: none, the object is never compared) — half the memory
    of a fleet's worth of objects."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    if drift and (managed := _kept_managed_fields(body["metadata"].get("managedFields"))):
        meta["managedFields"] = managed
    if any(a in (meta.get("annotations") or {}) for a in _BULKY_ANNOTATIONS):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k not in _BULKY_ANNOTATIONS}
    return {**dict(body), "metadata": meta}


@kopf.index(GROUP, VERSION, PLURAL, registry=registry)
async def llmservices(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): stored(body, drift=False)}


@kopf.index("apps", "v1", "deployments", labels=CHILD, registry=registry)
async def deployments(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


# Multi-node revisions. Served only where the LeaderWorkerSet CRD is installed (docs/distributed.md);
# elsewhere kopf reports the resource unresolved and this index stays empty.
@kopf.index(LWS_GROUP, LWS_VERSION, LWS_PLURAL, labels=CHILD, registry=registry)
async def leader_worker_sets(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


@kopf.index("v1", "services", labels=CHILD, registry=registry)
async def services(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=CHILD, registry=registry)
async def disruption_budgets(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD, registry=registry)
async def autoscalers(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


@kopf.index("v1", "pods", labels=CHILD, registry=registry)
async def pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): pod_summary(dict(body))}


# Index name -> (apiVersion, kind) of what it holds; the engine's periodic relist checks each.
INDEXED_KINDS = {
    "llmservices": (f"{GROUP}/{VERSION}", "LLMService"),
    "deployments": ("apps/v1", "Deployment"),
    "leader_worker_sets": (LWS_API_VERSION, LWS_KIND),
    "services": ("v1", "Service"),
    "disruption_budgets": ("policy/v1", "PodDisruptionBudget"),
    "autoscalers": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "pods": ("v1", "Pod"),
}


def _bind(memo: kopf.Memo, indexes: dict[str, Any]) -> Engine:
    """Point the engine at kopf's live indexes (kopf hands them only to handlers)."""
    engine: Engine = memo.engine
    if engine.indexes is None:
        engine.indexes = {name: indexes[name] for name in INDEXED_KINDS}
        engine.lookup = lambda key: lookup(engine, key)
    return engine


def lookup(engine: Engine, key: Key) -> tuple[dict | None, Children]:
    """The latest state of one LLMService and its children: the indexes, or what the operator
    wrote if they lag behind it, minus what the last relist found deleted."""
    recent, gone = engine.client.recent, engine.gone

    def latest(index: str, kind: str) -> list[dict]:
        objs = [recent.fresh(o) for o in engine.indexes[index].get(key, []) if o["metadata"].get("uid") not in gone]
        return objs + recent.unseen(key[0], LABEL_SERVICE, key[1], kind, {o["metadata"]["name"] for o in objs})

    parents = [recent.fresh(o) for o in engine.indexes["llmservices"].get(key, [])
               if o["metadata"].get("uid") not in gone]
    if not parents:
        recent.forget(*key)
    return (parents[0] if parents else None), Children(
        deployments=latest("deployments", "Deployment"),
        leader_worker_sets=latest("leader_worker_sets", LWS_KIND),
        services=latest("services", "Service"),
        disruption_budgets=latest("disruption_budgets", "PodDisruptionBudget"),
        autoscalers=latest("autoscalers", "HorizontalPodAutoscaler"),
        pods=[p for p in engine.indexes["pods"].get(key, []) if p.get("uid") not in gone],
    )


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
async def llmservice_changed(namespace: str, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
    _bind(memo, kwargs).poke((namespace, name))


@kopf.on.event("apps", "v1", "deployments", labels=CHILD, registry=registry)
@kopf.on.event(LWS_GROUP, LWS_VERSION, LWS_PLURAL, labels=CHILD, registry=registry)
@kopf.on.event("v1", "services", labels=CHILD, registry=registry)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=CHILD, registry=registry)
@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD, registry=registry)
@kopf.on.event("v1", "pods", labels=CHILD, registry=registry)
async def child_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    _bind(memo, kwargs).poke((namespace, labels[LABEL_SERVICE]))


@kopf.on.login(registry=registry)
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf's watches use the same credentials as the engine's client (re-read on every 401, so a
    rotated service-account token is picked up)."""
    config = memo.engine.client.config
    return kopf.ConnectionInfo(server=config.server, ca_data=config.ca_data, insecure=config.insecure,
                               token=config.bearer(), certificate_data=config.cert_data,
                               private_key_data=config.key_data, default_namespace=config.namespace)
