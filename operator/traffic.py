"""Traffic split between the stable and canary tracks through the Gateway API (pure builder).

With `spec.rollout.traffic.gatewayRef` and the Gateway API CRDs installed, the operator owns one
HTTPRoute `<name>` attached to that Gateway, whose backendRefs are the track Services
`<name>-stable` and `<name>-canary` with the weights `rollout.split()` computed: the canary's
weight never exceeds what its ready pods carry. Without a gateway the split is the replica ratio
behind the entry Service (each ready pod of either track gets an equal share), which is coarser
(steps of 1/replicas) but needs nothing installed.

`<name>-canary` always exists and selects the canary revision, or the stable one when no rollout
runs, so a route (or a client) pointed at it never dead-ends: at promotion both Services already
select the promoted pods when the route moves its weight back to `<name>-stable`.
"""

from __future__ import annotations

from .render import PREDICTOR_PORT, owner_reference
from .rollout import Split
from .spec import CANARY, STABLE, Spec, child_labels, track_service_name

GATEWAY_GROUP = "gateway.networking.k8s.io"
HTTPROUTE_API_VERSION = f"{GATEWAY_GROUP}/v1"
HTTPROUTE_DISCOVERY_PATH = f"/apis/{HTTPROUTE_API_VERSION}"


def gateway_api_installed(discovery: dict | None) -> bool:
    """Whether `GET /apis/gateway.networking.k8s.io/v1` lists HTTPRoutes (None: not served)."""
    return any(r.get("name") == "httproutes" for r in (discovery or {}).get("resources") or [])


def http_route(spec: Spec, gateway_ref: dict, cut: Split, stable_version: int) -> dict:
    """The HTTPRoute that splits `<name>`'s traffic by `cut`'s weights. The canary backendRef is
    present only while it has weight, so a finished rollout leaves a one-backend route."""
    parent = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": gateway_ref["name"]}
    for key in ("namespace", "sectionName"):
        if gateway_ref.get(key):
            parent[key] = gateway_ref[key]
    backends = [{"name": track_service_name(spec.name, STABLE), "port": PREDICTOR_PORT, "weight": cut.stable_weight}]
    if cut.canary_weight:
        backends.append({"name": track_service_name(spec.name, CANARY), "port": PREDICTOR_PORT,
                         "weight": cut.canary_weight})
    return {
        "apiVersion": HTTPROUTE_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": {"name": spec.name, "namespace": spec.namespace,
                     "labels": child_labels(spec.name, stable_version, STABLE),
                     "ownerReferences": [owner_reference(spec)]},
        "spec": {"parentRefs": [parent], "rules": [{"backendRefs": backends}]},
    }
