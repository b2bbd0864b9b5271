"""Autoscaling builders: spec.autoscaling -> HPA / KEDA ScaledObject, adapter rules, status."""

from pathlib import Path

import pytest
import yaml

from datetime import datetime, timezone

from llmserve.operator import autoscaling as a
from llmserve.operator.autoscaling_cli import render
from llmserve.operator.rollout import Observed, plan
from llmserve.operator.spec import Spec, deployment_name
from llmserve.operator.status import Observation, compute

CHART_RULES = Path(__file__).resolve().parents[2] / "charts" / "llmserve" / "files" / "prometheus-adapter.yaml"
LLMSERVICE = {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService", "name": "chat"}


def make(autoscaling=None, replicas=2):
    spec = {"model": {"name": "tiny", "repository": "pvc://models/repo", "version": 3}, "replicas": replicas}
    if autoscaling is not None:
        spec["autoscaling"] = autoscaling
    return Spec.from_object({"metadata": {"name": "chat", "namespace": "team-a", "uid": "uid-1", "generation": 2},
                             "spec": spec})


def test_spec_defaults_and_windows():
    scaling = make({"maxReplicas": 8}).autoscaling
    assert (scaling.min_replicas, scaling.max_replicas, scaling.metric, scaling.target, scaling.engine) == (
        1, 8, "queueComputeRatio", "1", "hpa")
    assert (scaling.scale_up_window, scaling.scale_down_window) == (0, 300)
    custom = make({"maxReplicas": 4, "scaleUp": {"stabilizationWindow": "10s"},
                   "scaleDown": {"stabilizationWindow": "1m30s"}}).autoscaling
    assert (custom.scale_up_window, custom.scale_down_window) == (10, 90)
    assert make().autoscaling is None
    assert a.autoscaler(make(), "") is None


def test_hpa_scales_the_llmservice_through_its_scale_subresource_on_an_object_metric():
    hpa = a.autoscaler(make({"minReplicas": 2, "maxReplicas": 8, "scaleDown": {"stabilizationWindow": "2m"}}), "")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["name"] == "chat" and hpa["metadata"]["namespace"] == "team-a"
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert hpa["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "llmserve"
    assert hpa["metadata"]["labels"]["llmserve.io/service"] == "chat"
    spec = hpa["spec"]
    # The target is the LLMService (its scale subresource), never a Deployment.
    assert spec["scaleTargetRef"] == LLMSERVICE
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 8)
    assert spec["metrics"] == [{"type": "Object", "object": {
        "describedObject": LLMSERVICE, "metric": {"name": "llmserve_queue_compute_ratio"},
        "target": {"type": "Value", "value": "1"}}}]
    assert spec["behavior"] == {"scaleUp": {"stabilizationWindowSeconds": 0},
                                "scaleDown": {"stabilizationWindowSeconds": 120}}


@pytest.mark.parametrize("key, name, target", [
    ("queueComputeRatio", "llmserve_queue_compute_ratio", {"type": "Value", "value": "1500m"}),
    ("queueLatency", "llmserve_queue_seconds", {"type": "Value", "value": "1500m"}),
    ("pendingRequests", "llmserve_pending_requests", {"type": "AverageValue", "averageValue": "1500m"}),
    ("gpuUtilization", "llmserve_gpu_utilization", {"type": "Value", "value": "1500m"}),
    ("waitingRequests", "llmserve_waiting_requests", {"type": "AverageValue", "averageValue": "1500m"}),
    ("kvCacheUsage", "llmserve_kv_cache_usage", {"type": "Value", "value": "1500m"}),
])
def test_each_signal_has_its_metric_and_target_type(key, name, target):
    hpa = a.horizontal_pod_autoscaler(make({"maxReplicas": 3, "metric": key, "target": "1500m"}))
    [metric] = hpa["spec"]["metrics"]
    assert metric["object"]["metric"] == {"name": name}
    assert metric["object"]["target"] == target


def test_adapter_rules_expose_every_signal_as_a_metric_of_llmservice_objects():
    rules = a.adapter_config()["rules"]
    assert {r["name"]["as"] for r in rules} == {m.name for m in a.METRICS.values()}
    for rule in rules:
        assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"},
                                                   "llmserve_io_service": {"group": "llmserve.io",
                                                                           "resource": "llmservices"}}}
        assert rule["seriesQuery"].endswith('{namespace!="",llmserve_io_service!=""}')
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        assert "${" not in rule["metricsQuery"]


def test_queries_sum_before_dividing_and_never_add_one_to_a_denominator():
    """triton server#8979: a per-model average and `1 + delta(...)` both under-report the queue."""
    for metric in a.METRICS.values():
        query = a.service_query(metric, "team-a", "chat")
        assert "avg(" not in query.replace("avg by", "")
        assert "1+" not in query.replace(" ", "")
        assert 'namespace="team-a",llmserve_io_service="chat"' in query
    ratio = a.service_query(a.METRICS["queueComputeRatio"], "ns", "svc")
    assert ratio.startswith("sum by (namespace,llmserve_io_service) (rate(nv_inference_queue_duration_us{")
    assert "/ clamp_min(sum by (namespace,llmserve_io_service) (rate(nv_inference_compute_infer_duration_us{" in ratio


def test_chart_ships_exactly_the_generated_rules():
    assert CHART_RULES.read_text() == render(), (
        "charts/llmserve/files/prometheus-adapter.yaml is stale: regenerate it with "
        "`llmserve autoscaling adapter-config -o charts/llmserve/files/prometheus-adapter.yaml`")
    assert yaml.safe_load(CHART_RULES.read_text()) == a.adapter_config()


def test_keda_scaled_object_uses_the_same_query_and_a_decimal_threshold():
    spec = make({"engine": "keda", "minReplicas": 0, "maxReplicas": 5, "metric": "pendingRequests",
                 "target": "500m", "scaleDown": {"stabilizationWindow": "10m"}})
    obj = a.autoscaler(spec, "http://prometheus.monitoring:9090")
    assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
    assert obj["spec"]["scaleTargetRef"] == LLMSERVICE
    assert (obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"], obj["spec"]["cooldownPeriod"]) == (0, 5, 600)
    assert obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 600}
    [trigger] = obj["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus.monitoring:9090",
        "query": a.service_query(a.METRICS["pendingRequests"], "team-a", "chat"),
        "threshold": "0.5"}
    ratio = a.autoscaler(make({"engine": "keda", "maxReplicas": 5, "target": "80"}), "http://p:9090")
    assert ratio["spec"]["triggers"][0]["metricType"] == "Value"
    assert ratio["spec"]["triggers"][0]["metadata"]["threshold"] == "80"


def test_keda_without_a_prometheus_address_says_what_to_set():
    with pytest.raises(a.AutoscalerUnavailable, match="prometheus.url"):
        a.autoscaler(make({"engine": "keda", "maxReplicas": 5}), "")


def test_ready_floor_lets_a_scaling_service_stay_ready_at_its_minimum():
    assert a.ready_floor(make(replicas=3)) == 3
    assert a.ready_floor(make({"minReplicas": 2, "maxReplicas": 8}, replicas=5)) == 2
    assert a.ready_floor(make({"minReplicas": 0, "maxReplicas": 8}, replicas=4)) == 1
    assert a.ready_floor(make({"minReplicas": 0, "maxReplicas": 8}, replicas=0)) == 0


def hpa_status(desired=3, **conditions):
    return {"status": {"desiredReplicas": desired, "currentReplicas": 2, "conditions": [
        {"type": t, "status": s, "reason": r, "message": m} for t, (s, r, m) in conditions.items()]}}


def test_observe_reports_desired_replicas_and_limits_without_the_moving_metric_value():
    spec = make({"maxReplicas": 3})
    assert a.observe(make(), None) == (None, None)
    block, trouble = a.observe(spec, None)
    assert block == {"engine": "hpa", "name": "chat", "metric": "llmserve_queue_compute_ratio", "target": "1",
                     "minReplicas": 1, "maxReplicas": 3}
    assert trouble is None
    block, trouble = a.observe(spec, hpa_status(
        AbleToScale=("True", "ReadyForNewScale", "recommended size matches current size"),
        ScalingActive=("True", "ValidMetricFound", "the HPA was able to compute a replica count"),
        ScalingLimited=("True", "TooManyReplicas", "the desired replica count is more than the maximum")))
    assert block["desiredReplicas"] == 3
    assert block["message"] == "the desired replica count is more than the maximum"
    assert trouble is None


def test_observe_turns_unreadable_metrics_into_a_degraded_reason():
    spec = make({"maxReplicas": 3})
    block, trouble = a.observe(spec, hpa_status(
        AbleToScale=("True", "SucceededGetScale", "the HPA controller was able to get the target's current scale"),
        ScalingActive=("False", "FailedGetObjectMetric", "unable to get metric llmserve_queue_compute_ratio")))
    assert trouble[0] == "MetricsUnavailable"
    assert "FailedGetObjectMetric" in trouble[1] and "llmserve_queue_compute_ratio" in trouble[1]
    assert block["message"] == "unable to get metric llmserve_queue_compute_ratio"
    _, trouble = a.observe(spec, hpa_status(AbleToScale=("False", "FailedGetScale", "forbidden")))
    assert trouble == ("AutoscalerFailing", "HorizontalPodAutoscaler chat cannot scale: forbidden")
    # Scaled to zero by hand: the HPA pauses on purpose, nothing is broken.
    _, trouble = a.observe(spec, hpa_status(ScalingActive=("False", "ScalingDisabled", "scaling is disabled")))
    assert trouble is None


def test_observe_keda_names_the_hpa_keda_creates():
    block, trouble = a.observe(make({"engine": "keda", "maxReplicas": 3}), None)
    assert block["name"] == "keda-hpa-chat" and block["engine"] == "keda" and trouble is None


def test_metric_label_matches_prometheus_sanitizing():
    assert a.metric_label("llmserve.io/service") == "llmserve_io_service"
    assert a.metric_label("app.kubernetes.io/managed-by") == "app_kubernetes_io_managed_by"


def deployment(ready, replicas):
    return {"metadata": {"name": deployment_name("chat", make().revision), "generation": 1},
            "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas, "availableReplicas": ready}}


def settled(spec):
    """The rollout plan of a service whose only revision is stable."""
    return plan(spec.rollout, spec.serving, spec.replicas, None, Observed(), datetime(2026, 1, 1, tzinfo=timezone.utc))


def conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_stays_ready_at_the_floor_while_the_autoscaler_adds_replicas():
    spec = make({"minReplicas": 1, "maxReplicas": 5}, replicas=4)
    scaling_up = compute(spec, Observation(deployments=[deployment(ready=1, replicas=4)]), None,
                         "2026-01-01T00:00:00Z", settled(spec))
    assert conditions(scaling_up)["Ready"] == ("True", "Available")
    assert conditions(scaling_up)["Progressing"] == ("True", "ReplicasStarting")
    assert scaling_up["autoscaling"]["maxReplicas"] == 5
    # Without autoscaling every requested replica must be ready.
    fixed = compute(make(replicas=4), Observation(deployments=[deployment(ready=1, replicas=4)]), None,
                    "2026-01-01T00:00:00Z", settled(make(replicas=4)))
    assert conditions(fixed)["Ready"][0] == "False" and "autoscaling" not in fixed


def test_status_degraded_when_the_hpa_cannot_read_its_metric():
    hpa = hpa_status(ScalingActive=("False", "FailedGetObjectMetric", "no metrics returned from custom metrics API"))
    status = compute(make({"maxReplicas": 5}), Observation(deployments=[deployment(ready=2, replicas=2)],
                                                           autoscaler=hpa), None, "2026-01-01T00:00:00Z",
                     settled(make({"maxReplicas": 5})))
    assert conditions(status)["Degraded"] == ("True", "MetricsUnavailable")
    assert conditions(status)["Ready"] == ("True", "Available")  # still serving at its current size
    assert status["autoscaling"]["desiredReplicas"] == 3


def test_rejected_scale_to_zero_names_the_feature_gate_and_keda():
    message = a.rejection(make({"minReplicas": 0, "maxReplicas": 2}), "spec.minReplicas: Invalid value: 0")
    assert "HPAScaleToZero" in message and "engine keda" in message
    assert "install KEDA" in a.rejection(make({"engine": "keda", "maxReplicas": 2}),
                                         "the server could not find the requested resource")


def test_cli_writes_the_adapter_config(tmp_path, capsys):
    from llmserve.cli import main

    assert main(["autoscaling", "adapter-config", "-o", str(tmp_path / "config.yaml")]) == 0
    assert (tmp_path / "config.yaml").read_text() == render()
    assert main(["autoscaling", "adapter-config"]) == 0
    assert capsys.readouterr().out == render()


def test_engine_signals_read_the_engine_metrics_of_every_pod_of_the_service():
    waiting = a.service_query(a.METRICS["waitingRequests"], "ns", "svc")
    assert waiting == ('sum by (namespace,llmserve_io_service) '
                       '(vllm:num_requests_waiting{namespace="ns",llmserve_io_service="svc"})')
    assert a.service_query(a.METRICS["kvCacheUsage"], "ns", "svc").startswith("avg by (namespace,llmserve_io_service) "
                                                                              "(vllm:kv_cache_usage_perc{")
