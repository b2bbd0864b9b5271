"""Autoscaling end to end on the test bed, with the real HPA controller and a real metrics path.

tritonserver (under load from local clients) -> Prometheus (scraping it with the labels the pods of
the LLMService get in the cluster) -> prometheus-adapter (the chart's rules, registered as the
custom metrics API) -> kube-controller-manager's HPA controller -> the LLMService's scale
subresource -> the operator -> Deployment -> scheduler -> KWOK GPU nodes.
"""

import json
import os

import pytest

from llmserve.operator.rollout import serving_spec
from llmserve.operator.units import parse_quantity
from llmserve.testbed.load import InferenceLoad
from llmserve.testbed.rollout import pull_revision
from llmserve.testbed.scaling import (
    MODEL, MODEL_INPUTS, first_pod, llmservice, snapshot, triton_target,
)
from llmserve.testbed.waiting import poll

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

METRIC = "llmserve_queue_compute_ratio"


def metrics_path(testbed, namespace, name, model_repo, triton_server, prometheus, metrics_adapter,
                 models=None, metric=METRIC, startup_timeout=120, cpus=None):
    """Once the LLMService's first pod is Ready: a tritonserver standing for it (on `cpus`, as a
    pod's cpuset), Prometheus scraping it with that pod's labels, the adapter with the chart's
    rules. Returns (triton, adapter, explain) once the HPA reads the metric through the aggregated
    API; `explain()` describes the state of the whole path for a timeout message."""
    pod = poll("the first pod of the LLMService to be Ready", lambda: first_pod(testbed, namespace, name), 120)
    triton = triton_server(model_repo, models or {MODEL: 1}, startup_timeout=startup_timeout, cpus=cpus)
    prom = prometheus([triton_target(triton.metrics_target, namespace, pod)])
    adapter = metrics_adapter(prom.url)
    poll("the adapter to discover the metric",
         lambda: f"llmservices.llmserve.io/{metric}" in adapter.metric_names(), 60)

    def explain():
        return f"{snapshot(testbed, namespace, name).explain()}\nPrometheus targets: {prom.target_health()}"

    poll("the HPA to read the metric through the aggregated API", lambda: snapshot(
        testbed, namespace, name).hpa_condition("ScalingActive").get("status") == "True", 120, explain=explain)
    return triton, adapter, explain


@pytest.mark.triton
@pytest.mark.prometheus
def test_load_on_triton_scales_the_llmservice_up_and_back_down(
        testbed, operator, namespace, sample_model_repo, triton_server, prometheus, metrics_adapter):
    name = "chat"
    testbed.apply(llmservice(name, namespace, min_replicas=1, max_replicas=3,
                             scale_down="10s"))
    hpa = poll("the operator to create the HPA", lambda: snapshot(testbed, namespace, name).hpa, 60)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
                                             "name": name}
    triton, adapter, explain = metrics_path(testbed, namespace, name, sample_model_repo, triton_server,
                                            prometheus, metrics_adapter)

    def metric():
        return adapter.object_metric(namespace, "llmservices.llmserve.io", name, METRIC)

    assert snapshot(testbed, namespace, name).replicas == 1
    assert metric()["value"] == "0"

    seen_up = []
    with InferenceLoad(triton.http_url, MODEL, MODEL_INPUTS, concurrency=4) as load:

        def scaled_up():
            s = snapshot(testbed, namespace, name)
            seen_up.append(s.replicas)
            # The operator reports the Deployment's pods a moment after the Deployment has them.
            return s if s.replicas == 3 and s.ready_pods == 3 and s.reported_replicas == 3 else None

        up = poll("the HPA to raise the LLMService to 3 Ready replicas", scaled_up, 240, explain=explain)
        loaded = metric()
        assert loaded["describedObject"]["kind"] == "LLMService"
        assert parse_quantity(loaded["value"]) > 1  # 4 clients on one 50 ms-at-a-time server: about 3
    assert load.stats.requests > 0 and load.stats.failures == 0, load.stats

    # The operator, not the HPA, set the Deployment's replicas; the LLMService stayed Ready.
    [deployment] = up.deployments
    assert deployment["metadata"]["labels"]["llmserve.io/track"] == "stable"
    assert deployment["spec"]["replicas"] == 3
    assert up.condition("Ready")["status"] == "True"
    assert up.llmservice["status"]["autoscaling"]["desiredReplicas"] == 3
    assert up.llmservice["status"]["replicas"] == 3
    assert seen_up == sorted(seen_up), f"replicas went down while under load: {seen_up}"

    seen_down = []

    def scaled_down():
        s = snapshot(testbed, namespace, name)
        seen_down.append(s.replicas)
        return s if s.replicas == 1 and s.pods == 1 and s.reported_replicas == 1 else None

    # The 1m rate window drains, then the 10s scale-down stabilization window passes.
    down = poll("the HPA to return the LLMService to 1 replica after the load", scaled_down, 300, explain=explain)
    assert seen_down == sorted(seen_down, reverse=True), f"replicas went up without load: {seen_down}"
    assert down.condition("Ready")["status"] == "True"
    assert down.condition("Degraded")["status"] == "False"
    assert metric()["value"] == "0"


def test_replicas_without_a_gpu_show_in_status(testbed, operator, namespace):
    """The autoscaler (here: the scale subresource written by hand, as the HPA would) asks for more
    replicas than the GPUs left; the service keeps serving and says why the rest do not run."""
    [node] = testbed.add_nodes(1, gpus=2, prefix=f"{namespace}-gpu")
    try:
        testbed.apply(llmservice("big", namespace, min_replicas=1, max_replicas=4,
                                 node_selector={"kubernetes.io/hostname": node}))
        poll("one replica Ready", lambda: snapshot(testbed, namespace, "big").ready_pods == 1, 120)
        testbed.kubectl("scale", "llms/big", "-n", namespace, "--replicas=4")

        def reported():
            status = snapshot(testbed, namespace, "big").llmservice.get("status") or {}
            return status if status.get("unschedulableReplicas") == 2 else None

        status = poll("2 unschedulable replicas in the status", reported, 120)
        conds = {c["type"]: c for c in status["conditions"]}
        assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "Unschedulable"
        assert "Insufficient nvidia.com/gpu" in conds["Degraded"]["message"]
        assert "lower spec.autoscaling.maxReplicas" in conds["Degraded"]["message"]
        # Two replicas run: the service is Ready at its floor and still progressing toward 4.
        assert conds["Ready"]["status"] == "True"
        assert conds["Progressing"]["status"] == "True"
        wide = testbed.kubectl("get", "llms/big", "-n", namespace, "-o", "wide").stdout
        assert "UNSCHEDULABLE" in wide.splitlines()[0]
    finally:
        testbed.kubectl("delete", "node", node, "--wait=false", check=False)


def test_scale_to_zero_without_the_feature_gate_and_removing_autoscaling(testbed, operator, namespace):
    testbed.apply(llmservice("idle", namespace, min_replicas=0, max_replicas=2))

    def rejected():
        status = snapshot(testbed, namespace, "idle").llmservice.get("status") or {}
        degraded = next((c for c in status.get("conditions", []) if c["type"] == "Degraded"), {})
        return degraded if degraded.get("reason") == "AutoscalerRejected" else None

    degraded = poll("the refused HPA to be reported", rejected, 60)
    assert "minReplicas" in degraded["message"] and "HPAScaleToZero" in degraded["message"]

    testbed.kubectl("patch", "llms/idle", "-n", namespace, "--type=json",
                    "-p", json.dumps([{"op": "replace", "path": "/spec/autoscaling/minReplicas", "value": 1}]))
    poll("the HPA to be created", lambda: snapshot(testbed, namespace, "idle").hpa, 60)
    testbed.kubectl("patch", "llms/idle", "-n", namespace, "--type=json",
                    "-p", json.dumps([{"op": "remove", "path": "/spec/autoscaling"}]))
    gone = poll("the HPA to be deleted with spec.autoscaling", lambda: (
        s if (s := snapshot(testbed, namespace, "idle")).hpa is None else None), 60)
    assert "autoscaling" not in gone.llmservice["status"]


def test_keda_without_a_prometheus_address_is_reported(testbed, operator, namespace):
    """The session's operator runs without --prometheus-url: a KEDA trigger cannot be built."""
    manifest = llmservice("kedaless", namespace, min_replicas=1, max_replicas=2)
    manifest["spec"]["autoscaling"]["engine"] = "keda"
    testbed.apply(manifest)

    def reported():
        status = snapshot(testbed, namespace, "kedaless").llmservice.get("status") or {}
        degraded = next((c for c in status.get("conditions", []) if c["type"] == "Degraded"), {})
        return degraded if degraded.get("reason") == "AutoscalerUnavailable" else None

    degraded = poll("the missing Prometheus address to be reported", reported, 60)
    assert "prometheus.url" in degraded["message"]


@pytest.mark.triton
@pytest.mark.prometheus
def test_the_autoscaler_and_a_canary_do_not_fight(
        testbed, operator, namespace, sample_model_repo, triton_server, prometheus, metrics_adapter):
    """argo-rollouts#3849, #2857: there an HPA scales the stable ReplicaSet to maxReplicas during a
    canary and keeps it there. Here the HPA moves only the LLMService's replicas, and the operator
    splits them by the step weight: at 4 replicas and 50 %, 2 stable + 2 canary; when the load
    goes, both tracks shrink with the total. Never more than maxReplicas + maxSurge pods."""
    name, max_replicas, max_surge = "duo", 4, 1
    manifest = llmservice(name, namespace, min_replicas=1, max_replicas=max_replicas,
                          scale_down="10s")
    manifest["spec"]["rollout"] = {"steps": [{"weight": 50, "pause": "1h"}], "maxSurge": max_surge}
    testbed.apply(manifest)
    triton, _, explain = metrics_path(testbed, namespace, name, sample_model_repo, triton_server, prometheus,
                                      metrics_adapter)
    seen = []

    def watch(done):
        def probe():
            s = snapshot(testbed, namespace, name)
            seen.append((s.replicas, s.track("stable"), s.track("canary")))
            return s if done(s) else None
        return probe

    with InferenceLoad(triton.http_url, MODEL, MODEL_INPUTS, concurrency=4) as load:
        poll("the HPA to raise the service to 4 Ready replicas", watch(
            lambda s: s.replicas == 4 and s.ready_pods == 4), 240, explain=explain)
        # A new version while the autoscaler holds 4 replicas; the manifest has no spec.replicas, so
        # applying it leaves the autoscaler's number alone.
        manifest["spec"]["model"]["version"] = 2
        testbed.apply(manifest)
        half = poll("the canary to hold 2 of the 4 replicas and 50 % of the traffic", watch(
            lambda s: (s.track("stable"), s.track("canary"), s.ready_pods) == (2, 2, 4)
            and (s.llmservice["status"].get("canary") or {}).get("weight") == 50), 120, explain=explain)
    assert half.replicas == 4
    assert load.stats.failures == 0, load.stats

    low = poll("both tracks to shrink with the load: 1 replica split 1 + 1", watch(
        lambda s: s.replicas == 1 and (s.track("stable"), s.track("canary")) == (1, 1) and s.pods == 2), 300,
        explain=explain)
    assert low.llmservice["status"]["rollout"]["phase"] == "Progressing"
    too_many = [state for state in seen if state[1] + state[2] > max_replicas + max_surge]
    assert not too_many, f"(replicas, stable, canary) above maxReplicas + maxSurge: {too_many}"


@pytest.mark.triton
@pytest.mark.prometheus
def test_the_engines_waiting_requests_scale_the_llmservice(
        testbed, operator, namespace, tiny_vllm_artifact, triton_server, prometheus, metrics_adapter, tmp_path):
    """Issue 10: an LLM engine batches inside the model, so Triton's queue stays empty however many
    requests wait; the engine's vllm:num_requests_waiting does not. vLLM (its CPU build inside
    tritonserver) runs one sequence at a time here (engineSettings.maxConcurrentSequences 1,
    delivered through the pod's puller command), 6 clients keep about 5 waiting, and the HPA
    (target 2 per pod) scales."""
    name, built, metric = "gen", tiny_vllm_artifact, "llmserve_waiting_requests"
    manifest = llmservice(name, namespace, min_replicas=1, max_replicas=2, target="2", scale_down="10s",
                          gpus=0)  # a CPU pod (KIND_CPU): what this machine's tritonserver can run
    manifest["spec"]["model"]["name"] = built.name
    manifest["spec"]["runtime"].update(engine="vllm", engineSettings={"maxConcurrentSequences": 1})
    manifest["spec"]["autoscaling"]["metric"] = "waitingRequests"
    testbed.apply(manifest)
    stored = json.loads(testbed.kubectl("get", "llms", name, "-n", namespace, "-o", "json").stdout)
    spec = pull_revision(stored, serving_spec(stored["spec"]), built.repo, tmp_path / "pulled")
    triton, adapter, explain = metrics_path(testbed, namespace, name, tmp_path / "pulled", triton_server, prometheus,
                                            metrics_adapter, models={spec.model: spec.version}, metric=metric,
                                            # One core, as a pod's: unconfined, the busy engine's spin-waits
                                            # starved the test bed's API server (lease GETs over 5 s).
                                            startup_timeout=600, cpus=frozenset({max(os.sched_getaffinity(0))}))

    def waiting():
        return parse_quantity(adapter.object_metric(namespace, "llmservices.llmserve.io", name, metric)["value"])

    assert snapshot(testbed, namespace, name).replicas == 1 and waiting() == 0
    generation = {"text_input": "Once upon a time", "max_tokens": 128}
    with InferenceLoad(triton.http_url, spec.model, generation, concurrency=6, endpoint="generate") as load:
        up = poll("the HPA to raise the LLMService to 2 replicas on waiting requests", lambda: (
            s if (s := snapshot(testbed, namespace, name)).replicas == 2 else None), 240, explain=explain)
        assert waiting() > 2  # about 5 waiting on one pod running one sequence at a time
    assert load.stats.requests > 0 and load.stats.failures == 0, load.stats
    assert up.llmservice["status"]["autoscaling"]["metric"] == metric
