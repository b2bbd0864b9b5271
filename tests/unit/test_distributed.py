"""Distributed inference (docs/distributed.md): parallelism arithmetic, the LeaderWorkerSet a
multi-node revision renders, and status counted in whole groups. Pure functions only."""

from datetime import datetime, timezone

import pytest

from llmserve.operator import lws, rollout
from llmserve.operator.parallelism import Parallelism, vllm_flags
from llmserve.operator.render import Images, desired_children, puller_command
from llmserve.operator.spec import Spec
from llmserve.operator.status import Observation, compute, pod_summary

IMAGES = Images(puller="llmserve/llmserve:test", predictor="llmserve/predictor:test")
T0 = "2026-01-01T00:00:00Z"


def make(runtime=None, replicas=2, **spec):
    return Spec.from_object({"metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 1},
                             "spec": {"replicas": replicas, "model": {"name": "big", "repository": "pvc://m/r",
                                                                      "version": 3},
                                      "runtime": runtime or {}, **spec}})


TWO_BY_FOUR = {"gpus": 4, "parallelism": {"nodes": 2}}  # one replica = 2 pods x 4 GPUs, tensor 8


def children(runtime):
    return {(c["kind"], c["metadata"]["name"]): c for c in desired_children(make(runtime), IMAGES)}


def the_lws(runtime=TWO_BY_FOUR):
    spec = make(runtime)
    return children(runtime)["LeaderWorkerSet", f"chat-{spec.revision}"]


# -- arithmetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime,expected", [
    ({}, Parallelism(1, 1, 1)),
    ({"gpus": 0}, Parallelism(1, 1, 1)),
    ({"gpus": 4}, Parallelism(4, 1, 1)),  # tensor defaults to every GPU of the replica
    ({"gpus": 4, "parallelism": {"pipeline": 2}}, Parallelism(2, 2, 1)),
    ({"gpus": 8, "parallelism": {"nodes": 2}}, Parallelism(16, 1, 2)),
    ({"gpus": 8, "parallelism": {"nodes": 2, "tensor": 8, "pipeline": 2}}, Parallelism(8, 2, 2)),
])
def test_tensor_defaults_to_the_gpus_of_a_replica(runtime, expected):
    assert Parallelism.from_runtime(runtime) == expected


def test_arithmetic_that_the_crd_refuses_is_refused_here_too():
    with pytest.raises(ValueError, match=r"gpus \(4\) x nodes \(2\) must equal tensor \(4\) x pipeline \(1\)"):
        Parallelism.from_runtime({"gpus": 4, "parallelism": {"nodes": 2, "tensor": 4}})


def test_engine_args_of_the_leader_and_flags_of_a_worker():
    one_node = Parallelism(tensor=4)
    assert one_node.engine_args() == {"tensor_parallel_size": 4}
    multi = Parallelism(tensor=8, pipeline=2, nodes=4)
    assert multi.engine_args() == {
        "tensor_parallel_size": 8, "pipeline_parallel_size": 2, "distributed_executor_backend": "mp",
        "nnodes": 4, "node_rank": 0, "master_addr": "$(LWS_LEADER_ADDRESS)", "master_port": 29501}
    flags = multi.worker_flags()
    assert flags[0] == "--headless"
    pairs = dict(zip(flags[1::2], flags[2::2]))
    assert pairs == {"--tensor-parallel-size": "8", "--pipeline-parallel-size": "2",
                     "--distributed-executor-backend": "mp", "--nnodes": "4", "--node-rank": "$(LWS_WORKER_INDEX)",
                     "--master-addr": "$(LWS_LEADER_ADDRESS)", "--master-port": "29501"}


def test_engine_args_as_vllm_flags():
    assert vllm_flags({"enforce_eager": True, "enable_prefix_caching": False, "max_model_len": 2048,
                       "compilation_config": {"level": 0}, "quantization": None}) == [
        "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "2048",
        "--compilation-config", '{"level": 0}']


# -- one node, several GPUs ----------------------------------------------------------------------

def test_one_node_several_gpus_is_one_pod_with_every_gpu_in_one_engine():
    kids = children({"gpus": 4})
    assert not any(kind == "LeaderWorkerSet" for kind, _ in kids)
    dep = next(c for (kind, _), c in kids.items() if kind == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "tritonserver")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "4"
    argv = puller_command(make({"gpus": 4}))
    assert '"tensor_parallel_size":4' in argv[argv.index("--engine-args") + 1]
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "4Gi"


# -- several nodes ------------------------------------------------------------------------------

def test_several_nodes_render_one_leader_worker_set_per_revision_instead_of_a_deployment():
    kids = children(TWO_BY_FOUR)
    spec = make(TWO_BY_FOUR)
    assert set(kids) == {("LeaderWorkerSet", f"chat-{spec.revision}"), ("Service", "chat"),
                         ("Service", "chat-stable"), ("Service", "chat-canary"), ("PodDisruptionBudget", "chat")}
    lws_obj = kids["LeaderWorkerSet", f"chat-{spec.revision}"]
    assert lws_obj["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert lws_obj["metadata"]["labels"]["llmserve.io/track"] == "stable"
    assert lws_obj["metadata"]["ownerReferences"][0]["uid"] == "u"
    body = lws_obj["spec"]
    assert body["replicas"] == 2  # spec.replicas counts groups
    assert body["startupPolicy"] == "LeaderCreated"
    template = body["leaderWorkerTemplate"]
    assert template["size"] == 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"


def test_leader_and_workers_come_from_the_same_revision():
    template = the_lws()["spec"]["leaderWorkerTemplate"]
    leader, worker = template["leaderTemplate"], template["workerTemplate"]
    revision = make(TWO_BY_FOUR).revision
    for member, role in ((leader, "leader"), (worker, "worker")):
        assert member["metadata"]["labels"]["llmserve.io/revision"] == revision
        assert member["metadata"]["labels"]["llmserve.io/role"] == role
        puller = member["spec"]["initContainers"][0]
        assert puller["command"] == puller_command(make(TWO_BY_FOUR))
        # Members of one group never share a node.
        [apart] = member["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert apart["topologyKey"] == "kubernetes.io/hostname"
        assert apart["matchLabelKeys"] == ["leaderworkerset.sigs.k8s.io/group-key"]
        assert apart["labelSelector"]["matchLabels"]["llmserve.io/revision"] == revision
    assert [c["name"] for c in leader["spec"]["containers"]] == ["tritonserver", "predictor"]
    [engine] = worker["spec"]["containers"]
    assert engine["name"] == "vllm-worker" and engine["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert engine["image"] == leader["spec"]["containers"][0]["image"]
    assert engine["command"][:5] == ["vllm", "serve", "/models/big/3", "--config", "/models/big/engine-args.yaml"]
    assert "--headless" in engine["command"]
    assert engine["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_leader_engine_is_rank_zero_of_the_group():
    argv = puller_command(make(TWO_BY_FOUR))
    args = argv[argv.index("--engine-args") + 1]
    for part in ('"nnodes":2', '"node_rank":0', '"master_addr":"$(LWS_LEADER_ADDRESS)"', '"tensor_parallel_size":8',
                 '"distributed_executor_backend":"mp"'):
        assert part in args


def test_the_specs_own_affinity_is_kept_beside_the_group_anti_affinity():
    zone = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    runtime = {**TWO_BY_FOUR, "affinity": zone}
    affinity = the_lws(runtime)["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["affinity"]
    assert affinity["nodeAffinity"] == zone["nodeAffinity"]
    assert len(affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]) == 1
    assert "podAntiAffinity" not in make(runtime).affinity  # the spec's own view is not mutated


def test_topology_key_asks_for_exclusive_placement():
    placed = the_lws({**TWO_BY_FOUR, "parallelism": {"nodes": 2, "topologyKey": "example.com/nvlink-domain"}})
    assert placed["metadata"]["annotations"] == {
        "leaderworkerset.sigs.k8s.io/exclusive-topology": "example.com/nvlink-domain"}
    assert "annotations" not in the_lws()["metadata"]


def test_canary_of_a_multi_node_model_is_a_second_leader_worker_set():
    from llmserve.operator.render import Tracks

    stable, canary = make(TWO_BY_FOUR), make(TWO_BY_FOUR, model={"name": "big", "repository": "pvc://m/r",
                                                                  "version": 4})
    kids = desired_children(stable, IMAGES, Tracks(stable, 2, canary, 1))
    sets = {c["metadata"]["name"]: c for c in kids if c["kind"] == "LeaderWorkerSet"}
    assert set(sets) == {f"chat-{stable.revision}", f"chat-{canary.revision}"}
    assert sets[f"chat-{canary.revision}"]["metadata"]["labels"]["llmserve.io/track"] == "canary"
    assert sets[f"chat-{canary.revision}"]["spec"]["replicas"] == 1


# -- status in whole groups ---------------------------------------------------------------------

def lws_status(spec, ready, replicas=2):
    return {"kind": "LeaderWorkerSet", "metadata": {"name": f"chat-{spec.revision}", "generation": 1},
            "spec": {"leaderWorkerTemplate": {"size": 2}},
            "status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas,
                       "conditions": [{"type": "Available", "status": "True", "observedGeneration": 1}]}}


def member(spec, group, worker, ready=True, **status):
    labels = {"llmserve.io/model-version": "3", "llmserve.io/revision": spec.revision,
              "leaderworkerset.sigs.k8s.io/name": f"chat-{spec.revision}",
              "leaderworkerset.sigs.k8s.io/group-index": str(group),
              "leaderworkerset.sigs.k8s.io/worker-index": str(worker)}
    name = f"chat-{spec.revision}-{group}" + (f"-{worker}" if worker else "")
    return pod_summary({"metadata": {"name": name, "labels": labels},
                        "status": {"conditions": [{"type": "Ready", "status": str(ready)}], **status}})


def status_of(spec, seen):
    ready = {o["metadata"]["name"]: o["status"]["readyReplicas"] for o in seen.deployments}
    observed = rollout.Observed(ready.get(f"chat-{spec.revision}", 0), 0)
    plan = rollout.plan(spec.rollout, spec.serving, spec.replicas, None, observed, datetime(2026, 1, 1, tzinfo=timezone.utc))
    return compute(spec, seen, None, T0, plan)


def test_groups_with_every_member_ready_are_ready_replicas():
    spec = make(TWO_BY_FOUR)
    pods = [member(spec, g, w) for g in (0, 1) for w in (0, 1)]
    status = status_of(spec, Observation(deployments=[lws_status(spec, ready=2)], pods=pods))
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("True", "Available")
    assert ready["message"].startswith("2/2 replicas")
    assert status["replicas"] == 2
    assert status["selector"].endswith(",llmserve.io/role notin (worker)")


def test_a_group_missing_a_member_is_not_ready_even_if_the_controller_has_not_noticed():
    spec = make(TWO_BY_FOUR, replicas=1)
    # The controller still says 1 ready group; the worker of group 0 is gone.
    status = status_of(spec, Observation(deployments=[lws_status(spec, ready=1, replicas=1)],
                                         pods=[member(spec, 0, 0)]))
    assert status["conditions"][0]["status"] == "False"
    assert status["conditions"][0]["message"].startswith("0/1 replicas")


def test_a_group_that_cannot_be_placed_completely_is_unschedulable_with_the_schedulers_reason():
    spec = make(TWO_BY_FOUR, replicas=1)
    reason = "0/4 nodes are available: 3 Insufficient nvidia.com/gpu, 1 node(s) didn't match pod topology spread."
    stuck = {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": reason}]}
    pods = [member(spec, 0, 0, ready=False), member(spec, 0, 1, ready=False, **stuck)]
    status = status_of(spec, Observation(deployments=[lws_status(spec, ready=0, replicas=1)], pods=pods))
    ready, degraded = status["conditions"][0], status["conditions"][2]
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")
    assert reason in degraded["message"]
    assert f"incomplete groups chat-{spec.revision}/0: a replica needs all its 2 pods" in degraded["message"]
    assert status["unschedulableReplicas"] == 1


def test_counts_read_a_leader_worker_set_in_groups():
    spec = make(TWO_BY_FOUR)
    counts = lws.counts(lws_status(spec, ready=1))
    assert counts == {"replicas": 2, "ready": 1, "updated": 2, "available": 1, "settled": True, "deadline": False}
    assert lws.counts(None)["settled"] is False
