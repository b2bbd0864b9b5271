"""The Gateway API HTTPRoute that splits traffic between the track Services."""

from llmserve.operator.rollout import split
from llmserve.operator.spec import Spec
from llmserve.operator.traffic import gateway_api_installed, http_route

SPEC = Spec.from_object({"metadata": {"name": "chat", "namespace": "team-a", "uid": "u1"},
                         "spec": {"model": {"name": "tiny", "repository": "pvc://m/r", "version": 3}}})


def backends(route):
    return [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]]


def test_route_weights_follow_the_split_and_name_the_track_services():
    route = http_route(SPEC, {"name": "gw", "namespace": "infra"}, split(4, 25, 1, 1), 3)
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["kind"] == "HTTPRoute"
    assert route["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "gw", "namespace": "infra"}]
    assert backends(route) == [("chat-stable", 3), ("chat-canary", 1)]
    for b in route["spec"]["rules"][0]["backendRefs"]:
        assert b["port"] == 8080


def test_a_canary_without_ready_pods_is_not_a_backend():
    assert backends(http_route(SPEC, {"name": "gw"}, split(4, 25, 0, 1), 3)) == [("chat-stable", 1)]


def test_discovery_answer():
    assert gateway_api_installed({"resources": [{"name": "gateways"}, {"name": "httproutes"}]})
    assert not gateway_api_installed({"resources": [{"name": "gateways"}]}) and not gateway_api_installed(None)
