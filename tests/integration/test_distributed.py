"""Multi-node LLMServices on the test bed (docs/distributed.md): the operator renders
LeaderWorkerSets, the real LeaderWorkerSet controller (built from sigs.k8s.io/lws, with its
webhooks) turns them into leader and worker StatefulSets, the real scheduler places every member
on its own KWOK GPU node, and the status counts whole groups."""

from __future__ import annotations

import json

import pytest

from fixtures.operator import get_json, wait_for
from llmserve.operator.lws import LABEL_GROUP_INDEX, LABEL_ROLE, LABEL_SET_NAME, LABEL_WORKER_INDEX
from llmserve.operator.rollout import revision_name, serving_spec

pytestmark = pytest.mark.cluster


def llmservice(name, namespace, *, gpus, nodes, replicas=1, version=1, **spec):
    return {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"name": "big", "repository": "pvc://models", "version": version},
                     "replicas": replicas,
                     "runtime": {"gpus": gpus, "parallelism": {"nodes": nodes}, "startupTimeout": "2m"}, **spec}}


def set_name(testbed, namespace, name):
    return f"{name}-{revision_name(serving_spec(get_json(testbed, 'llms', name, '-n', namespace)['spec']))}"


def members(testbed, namespace, lws):
    pods = get_json(testbed, "pods", "-n", namespace, "-l", f"{LABEL_SET_NAME}={lws}")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def condition(obj, type_):
    return next((c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == type_), {})


def ready(testbed, namespace, name):
    obj = get_json(testbed, "llms", name, "-n", namespace)
    return obj if condition(obj, "Ready").get("status") == "True" else None


@pytest.mark.parametrize("runtime,message", [
    ({"gpus": 4, "parallelism": {"nodes": 2, "tensor": 4}}, "parallelism does not match the GPUs"),
    ({"gpus": 3, "parallelism": {"pipeline": 2}}, "parallelism.pipeline must divide the GPUs of a replica"),
    ({"gpus": 0, "parallelism": {"nodes": 2}}, "with gpus 0 (one CPU pod) tensor, pipeline and nodes must be 1"),
    ({"gpus": 2, "engine": "onnxruntime", "parallelism": {"tensor": 2}}, "need engine vllm"),
    ({"gpus": 2, "parallelism": {"topologyKey": "zone"}}, "topologyKey places the pods of a multi-node replica"),
])
def test_the_api_server_refuses_parallelism_that_does_not_add_up(testbed, llmserve_chart, runtime, message):
    obj = llmservice("bad", "default", gpus=1, nodes=1)  # a server-side dry run: nothing is stored
    obj["spec"]["runtime"] = runtime
    result = testbed.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize("verb,allowed", [("watch", True), ("create", True), ("patch", True), ("delete", True),
                                           ("update", False)])
def test_the_operators_service_account_manages_leader_worker_sets(testbed, lws_controller, verb, allowed):
    # With the CRD installed: kubectl resolves the resource only through discovery.
    result = testbed.kubectl("auth", "can-i", verb, "leaderworkersets.leaderworkerset.x-k8s.io", "--all-namespaces",
                             "--as=system:serviceaccount:llmserve-system:llmserve", check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no")


def test_two_nodes_by_four_gpus_become_one_ready_replica(testbed, lws_controller, namespace):
    testbed.apply(llmservice("big", namespace, gpus=4, nodes=2))
    obj = wait_for(lambda: ready(testbed, namespace, "big"), "the 2-node x 4-GPU service Ready", timeout=180)
    lws = set_name(testbed, namespace, "big")
    assert obj["status"]["stable"]["deployment"] == lws
    assert obj["status"]["replicas"] == 1
    assert condition(obj, "Ready")["message"].startswith("1/1 replicas")

    the_set = get_json(testbed, "leaderworkersets", lws, "-n", namespace)
    assert the_set["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert the_set["status"]["readyReplicas"] == 1
    pods = members(testbed, namespace, lws)
    assert sorted(p["metadata"]["labels"][LABEL_ROLE] for p in pods) == ["leader", "worker"]
    # Placed by the real scheduler on two distinct GPU nodes, each pod with 4 GPUs.
    assert len({p["spec"]["nodeName"] for p in pods}) == 2
    for pod in pods:
        engine = pod["spec"]["containers"][0]
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == "4"
        env = {e["name"]: e.get("value") for e in engine.get("env", [])}
        # Injected by the LeaderWorkerSet pod webhook; the worker's command dials this address.
        assert env["LWS_LEADER_ADDRESS"] == f"{lws}-0.{lws}.{namespace}"
        assert env["LWS_WORKER_INDEX"] == pod["metadata"]["labels"][LABEL_WORKER_INDEX]
    # The scale subresource counts groups.
    scale = get_json(testbed, "llms", "big", "-n", namespace, "--subresource=scale")
    assert scale["status"]["replicas"] == 1 and "llmserve.io/role notin (worker)" in scale["status"]["selector"]


def test_a_group_that_cannot_be_placed_completely_is_unschedulable_and_not_ready(testbed, lws_controller, namespace):
    nodes = len(get_json(testbed, "nodes")["items"])
    # One member more than there are nodes: the last one has no node of its own.
    testbed.apply(llmservice("wide", namespace, gpus=1, nodes=nodes + 1))

    def stuck():
        obj = get_json(testbed, "llms", "wide", "-n", namespace)
        return obj if condition(obj, "Degraded").get("reason") == "Unschedulable" else None

    obj = wait_for(stuck, "the incomplete group reported Unschedulable", timeout=120)
    message = condition(obj, "Degraded")["message"]
    assert "didn't match pod anti-affinity rules" in message  # the scheduler's own reason
    assert "incomplete groups" in message
    assert condition(obj, "Ready")["status"] == "False"
    assert obj["status"]["unschedulableReplicas"] == 1
    lws = set_name(testbed, namespace, "wide")
    placed = [p for p in members(testbed, namespace, lws) if p["spec"].get("nodeName")]
    assert len(placed) == nodes  # the rest of the group runs, and still no replica is Ready


def test_a_deleted_member_recreates_its_group(testbed, lws_controller, namespace):
    testbed.apply(llmservice("big", namespace, gpus=4, nodes=2))
    wait_for(lambda: ready(testbed, namespace, "big"), "the service Ready", timeout=180)
    lws = set_name(testbed, namespace, "big")
    leader = next(p for p in members(testbed, namespace, lws) if p["metadata"]["labels"][LABEL_ROLE] == "leader")
    worker = next(p for p in members(testbed, namespace, lws) if p["metadata"]["labels"][LABEL_ROLE] == "worker")
    testbed.kubectl("delete", "pod", "-n", namespace, worker["metadata"]["name"], "--wait=false")

    def leader_replaced():
        pods = members(testbed, namespace, lws)
        leaders = [p for p in pods if p["metadata"]["labels"][LABEL_ROLE] == "leader"]
        return leaders and leaders[0]["metadata"]["uid"] != leader["metadata"]["uid"]

    # RecreateGroupOnPodRestart: the controller deletes the leader, and with it the whole group.
    wait_for(leader_replaced, "the group's leader recreated after a worker was deleted", timeout=120)
    obj = wait_for(lambda: ready(testbed, namespace, "big"), "the recreated group Ready again", timeout=180)
    pods = members(testbed, namespace, lws)
    assert {p["metadata"]["labels"][LABEL_GROUP_INDEX] for p in pods} == {"0"} and len(pods) == 2
    assert obj["status"]["replicas"] == 1


def test_the_scale_subresource_adds_whole_groups(testbed, lws_controller, namespace):
    """What an HPA does to an LLMService (it writes the scale subresource) adds groups, not pods."""
    testbed.apply(llmservice("big", namespace, gpus=2, nodes=2))
    wait_for(lambda: ready(testbed, namespace, "big"), "the service Ready", timeout=180)
    testbed.kubectl("scale", "llms/big", "-n", namespace, "--replicas=2")

    def two_groups():
        obj = ready(testbed, namespace, "big")
        return obj if obj and condition(obj, "Ready")["message"].startswith("2/2 replicas") else None

    obj = wait_for(two_groups, "two complete groups Ready", timeout=180)
    lws = set_name(testbed, namespace, "big")
    assert get_json(testbed, "leaderworkersets", lws, "-n", namespace)["spec"]["replicas"] == 2
    pods = members(testbed, namespace, lws)
    assert len(pods) == 4 and {p["metadata"]["labels"][LABEL_GROUP_INDEX] for p in pods} == {"0", "1"}
    assert obj["status"]["replicas"] == 2


def test_a_new_version_rolls_out_as_a_second_leader_worker_set_within_one_group_of_surge(
        testbed, lws_controller, namespace):
    # One replica of 2 nodes x 8 GPUs on a bed of 4 x 8-GPU nodes: the stable group and one surge
    # group fill every GPU, so the rollout completes only if surge is counted in whole groups.
    testbed.apply(llmservice("big", namespace, gpus=8, nodes=2))
    wait_for(lambda: ready(testbed, namespace, "big"), "v1 Ready", timeout=180)
    old = set_name(testbed, namespace, "big")
    testbed.apply(llmservice("big", namespace, gpus=8, nodes=2, version=2))
    new = set_name(testbed, namespace, "big")
    seen_sets, most_groups = set(), 0

    def promoted():
        nonlocal most_groups
        sets = get_json(testbed, "leaderworkersets", "-n", namespace)["items"]
        seen_sets.update(s["metadata"]["name"] for s in sets)
        most_groups = max(most_groups, sum(s["spec"]["replicas"] for s in sets))
        obj = get_json(testbed, "llms", "big", "-n", namespace)
        done = (obj["status"].get("stable") or {}).get("version") == 2 and condition(obj, "Ready")["status"] == "True"
        return obj if done and [s["metadata"]["name"] for s in sets] == [new] else None

    obj = wait_for(promoted, "v2 promoted and the v1 LeaderWorkerSet removed", timeout=300)
    assert {old, new} <= seen_sets  # the canary was a second LeaderWorkerSet
    assert most_groups <= 2  # replicas + maxSurge groups, never more
    assert obj["status"]["history"][-1]["version"] == 2
