"""kopf wiring: watch indexes and handlers that only route events to the engine's reconcile.

- Indexes keep the LLMServices and their children in memory from kopf's watch streams, so a
  reconcile reads what it needs without a single API request. Children are watched with a
  server-side label selector (`app.kubernetes.io/managed-by=llmserve`), so the operator never
  lists the cluster's other Deployments, Services or pods.
- `@on.event` on LLMServices, their children and pods reconciles the LLMService: level-based, the
  engine reads the whole state from the indexes and retries failures with backoff itself. Event
  handlers keep no kopf state, so the operator never writes kopf's progress or last-handled
  annotations: it needs no `patch` (nor `get`) on llmservices, only `patch` on their status. A
  deleted or hand-edited child is repaired the same way, and pod scheduling reaches the status.
- No delete handler, daemon or timer: those would put a kopf finalizer on every LLMService.
  Deletion is the garbage collector's job (ownerReferences).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .engine import Engine, Key
from .reconcile import Children
from .spec import GROUP, LABEL_MANAGED_BY, LABEL_SERVICE, MANAGED_SELECTOR, MANAGER, PLURAL, VERSION
from .status import pod_summary

registry = kopf.OperatorRegistry()

CHILD = {LABEL_MANAGED_BY: MANAGER, LABEL_SERVICE: kopf.PRESENT}
CHILD_RESOURCES = (("apps", "v1", "deployments"), ("v1", "services"),
                   ("policy", "v1", "poddisruptionbudgets"), ("autoscaling", "v2", "horizontalpodautoscalers"),
                   ("v1", "pods"))


def watch_settings(settings: kopf.OperatorSettings) -> None:
    """Server-side filtering of the child watches, no cluster scanning, only error Events from kopf."""
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = MANAGED_SELECTOR
    settings.scanning.disabled = True  # no CRD/namespace watching: not needed, and not in our RBAC
    settings.posting.level = logging.ERROR  # kopf posts only errors as Events; ours say what we did


# Annotations of no use to a reconcile that can be as large as the object itself.
_BULKY_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def stored(body: kopf.Body) -> dict:
    """What the indexes keep of an object: all but managedFields and bulky annotations (half the
    memory of a fleet's worth of objects)."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    if any(a in (meta.get("annotations") or {}) for a in _BULKY_ANNOTATIONS):
        meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k not in _BULKY_ANNOTATIONS}
    return {**dict(body), "metadata": meta}


@kopf.index(GROUP, VERSION, PLURAL, registry=registry)
def llmservices(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): stored(body)}


@kopf.index("apps", "v1", "deployments", labels=CHILD, registry=registry)
def deployments(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


@kopf.index("v1", "services", labels=CHILD, registry=registry)
def services(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=CHILD, registry=registry)
def disruption_budgets(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD, registry=registry)
def autoscalers(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): stored(body)}


@kopf.index("v1", "pods", labels=CHILD, registry=registry)
def pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SERVICE]): pod_summary(dict(body))}


def _bind(memo: kopf.Memo, indexes: dict[str, Any]) -> Engine:
    """Point the engine at kopf's live indexes (kopf hands them only to handlers)."""
    engine: Engine = memo.engine

    def lookup(key: Key) -> tuple[dict | None, Children]:
        """The latest state: the indexes, or what the operator wrote if they lag behind it."""
        def latest(index: str) -> list[dict]:
            return [engine.client.recent.fresh(o) for o in indexes[index].get(key, [])]

        parents = latest("llmservices")
        if not parents:
            engine.client.recent.forget(*key)
        return (parents[0] if parents else None), Children(
            deployments=latest("deployments"),
            services=latest("services"),
            disruption_budgets=latest("disruption_budgets"),
            autoscalers=latest("autoscalers"),
            pods=list(indexes["pods"].get(key, [])),
        )

    engine.lookup = lookup
    return engine


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
async def llmservice_changed(namespace: str, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
    _bind(memo, kwargs).poke((namespace, name))


@kopf.on.event("apps", "v1", "deployments", labels=CHILD, registry=registry)
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
