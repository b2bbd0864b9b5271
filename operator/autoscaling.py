"""Autoscaling an LLMService on Triton's load signals: pure builders, no I/O.

What scales what (DESIGN §5, argo-rollouts#3849, #2857, #4607): the autoscaler owns one number,
the LLMService's `spec.replicas`, through its `scale` subresource; the operator alone turns that
number into Deployment replicas, split between the stable and canary tracks by the rollout
weight. An HPA aimed at the Deployments would fight that split (Argo's bugs: the HPA sees the
canary's pods, scales the stable ReplicaSet up to maxReplicas and never back); aimed at the
LLMService it cannot, because no Deployment is its target.

Which metric shape (the choice that makes the rest simple): every load signal is a property of
the whole service, exposed by prometheus-adapter as a custom metric *of the LLMService object*
(`Object` metrics, `describedObject` = the LLMService), aggregated over all of its pods of both
tracks by the labels Prometheus relabels from the pods (`namespace`, `llmserve_io_service`).
- Ratios and latencies (queue/compute ratio, queue time, GPU utilization) use target type
  `Value`: the HPA computes `ceil(current / target x ready pods)`. Pods that are still starting,
  or that cannot be scheduled, are not ready, so a scale-up waiting for GPUs does not snowball
  into maxReplicas while the signal stays high.
- Pending requests are a count: target type `AverageValue`, `ceil(total / per-pod target)`.
- No per-pod series (`Pods` metrics) are needed, so the rules never depend on pod names, and the
  adapter serves only the custom metrics API: the external metrics API stays free for KEDA,
  which claims it for itself.

Why these queries (data-on-eks#788, triton server#6247, #8979): queue time alone grows with
request size and batch; the ratio of time spent queued to time spent computing says how much
more capacity would help, whatever the model. Each query sums the counters of every model and
pod *before* dividing (a per-model average under-reports the queue of a pod with idle models),
and never adds 1 to a denominator (which under-reports at low rates).

The same query templates feed the prometheus-adapter rules (`adapter_config`, shipped in the
chart as `charts/llmserve/files/prometheus-adapter.yaml`) and the KEDA trigger, so both engines
scale on exactly the same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from string import Template

from .render import _metadata
from .spec import API_VERSION, GROUP, KIND, LABEL_SERVICE, PLURAL, STABLE, Autoscaling, Spec
from .units import parse_quantity

HPA, KEDA = "hpa", "keda"
KEDA_API_VERSION = "keda.sh/v1alpha1"
# Rate window of the counter-based signals. A ratio of two rates over the same window reacts as
# soon as the first loaded samples arrive (both rates move together), while one minute of history
# keeps a burst of a few seconds from looking like sustained load.
RATE_WINDOW = "1m"
NAMESPACE_LABEL = "namespace"  # what Kubernetes service discovery relabels the pod namespace into


def metric_label(key: str) -> str:
    """The Prometheus label a pod label becomes under `labelmap` (`llmserve.io/service` ->
    `llmserve_io_service`): Prometheus replaces every character outside [a-zA-Z0-9_]."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


SERVICE_LABEL = metric_label(LABEL_SERVICE)


@dataclass(frozen=True)
class LoadMetric:
    """One load signal: its name in the custom metrics API and how Prometheus computes it.

    `query` is a `string.Template` over `${sel}` (label matchers of one service's pods) and `${by}`
    (the labels to keep); `series` is the Triton series whose presence makes the metric exist.
    """

    key: str  # spec.autoscaling.metric
    name: str
    series: str
    query: str
    per_pod: bool  # the target is per pod (HPA AverageValue) rather than for the service (Value)
    meaning: str

    def promql(self, sel: str, by: str) -> str:
        return Template(self.query).substitute(sel=sel, by=by)


def _rate(series: str) -> str:
    """Per-second increase of a Triton counter, summed over the selected pods."""
    return f"sum by (${{by}}) (rate({series}{{${{sel}}}}[{RATE_WINDOW}]))"


def _gauge(key: str, name: str, series: str, aggregate: str, meaning: str, *,
           per_pod: bool = False, scale: str = "") -> LoadMetric:
    """A signal read straight off one gauge, aggregated (`sum`, `avg`) over the selected pods."""
    return LoadMetric(key, name, series, f"{scale}{aggregate} by (${{by}}) ({series}{{${{sel}}}})",
                      per_pod=per_pod, meaning=meaning)


METRICS = {m.key: m for m in (
    LoadMetric(
        "queueComputeRatio", "llmserve_queue_compute_ratio", "nv_inference_queue_duration_us",
        f"{_rate('nv_inference_queue_duration_us')}"
        f" / clamp_min({_rate('nv_inference_compute_infer_duration_us')}, 1)",
        per_pod=False,
        meaning="time requests spent queued per unit of time spent computing, over all pods (1 = "
                "as long in the queue as on the GPU)"),
    LoadMetric(
        "queueLatency", "llmserve_queue_seconds", "nv_inference_queue_duration_us",
        f"{_rate('nv_inference_queue_duration_us')} / 1e6"
        f" / clamp_min({_rate('nv_inference_request_success')}, 0.001)",
        per_pod=False,
        meaning="average seconds a request waited in Triton's queue (target e.g. 100m = 100 ms)"),
    _gauge("pendingRequests", "llmserve_pending_requests", "nv_inference_pending_request_count", "sum",
           "requests received and not yet answered, per pod", per_pod=True),
    _gauge("gpuUtilization", "llmserve_gpu_utilization", "nv_gpu_utilization", "avg",
           "average GPU utilization of the service's pods, in percent (target e.g. 80)", scale="100 * "),
    # The engine's own view (docs/engines.md#metrics): an LLM engine batches inside the model, so
    # Triton's queue stays empty while requests wait for a batch slot or for KV-cache room.
    _gauge("waitingRequests", "llmserve_waiting_requests", "vllm:num_requests_waiting", "sum",
           "requests the engine holds waiting for a batch slot or KV-cache room, per pod", per_pod=True),
    _gauge("kvCacheUsage", "llmserve_kv_cache_usage", "vllm:kv_cache_usage_perc", "avg",
           "average fraction of the engine's KV cache in use over the service's pods (target e.g. 800m)"),
)}


def adapter_config() -> dict:
    """prometheus-adapter configuration exposing every load signal as a custom metric of the
    LLMService objects (`custom.metrics.k8s.io/v1beta1/namespaces/<ns>/llmservices.llmserve.io/
    <name>/<metric>`). `<<.LabelMatchers>>` selects one service's pods, `<<.GroupBy>>` keeps the
    service label the adapter maps back to the object."""
    rules = []
    for metric in METRICS.values():
        rules.append({
            "seriesQuery": f'{metric.series}{{{NAMESPACE_LABEL}!="",{SERVICE_LABEL}!=""}}',
            "resources": {"overrides": {
                NAMESPACE_LABEL: {"resource": "namespace"},
                SERVICE_LABEL: {"group": GROUP, "resource": PLURAL},
            }},
            "name": {"matches": f"^{metric.series}$", "as": metric.name},
            "metricsQuery": metric.promql("<<.LabelMatchers>>", "<<.GroupBy>>"),
        })
    return {"rules": rules}


def service_query(metric: LoadMetric, namespace: str, service: str) -> str:
    """The same signal as the adapter serves, for one LLMService, as one PromQL expression."""
    sel = f'{NAMESPACE_LABEL}="{namespace}",{SERVICE_LABEL}="{service}"'
    return metric.promql(sel, f"{NAMESPACE_LABEL},{SERVICE_LABEL}")


def _behavior(scaling: Autoscaling) -> dict:
    """Stabilization windows: scale up on the lowest recommendation of the last `scaleUp` window,
    down on the highest of the last `scaleDown` window, so a dip in load never removes GPUs that
    the next minute needs again (no flapping). Rate policies stay the HPA's defaults."""
    return {"scaleUp": {"stabilizationWindowSeconds": int(scaling.scale_up_window)},
            "scaleDown": {"stabilizationWindowSeconds": int(scaling.scale_down_window)}}


def _scale_target(spec: Spec) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": spec.name}


def horizontal_pod_autoscaler(spec: Spec) -> dict:
    """The autoscaling/v2 HPA of an LLMService: scales the LLMService through its scale
    subresource on one Object metric of the LLMService itself."""
    scaling = spec.autoscaling
    metric = METRICS[scaling.metric]
    target = ({"type": "AverageValue", "averageValue": scaling.target} if metric.per_pod
              else {"type": "Value", "value": scaling.target})
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(spec, spec.name, spec.version, STABLE),
        "spec": {
            "scaleTargetRef": _scale_target(spec),
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [{"type": "Object", "object": {
                "describedObject": _scale_target(spec),
                "metric": {"name": metric.name},
                "target": target,
            }}],
            "behavior": _behavior(scaling),
        },
    }


def _decimal(quantity: str) -> str:
    """A quantity as the plain decimal KEDA's thresholds take (`500m` -> `0.5`)."""
    return format(parse_quantity(quantity).normalize(), "f")


def scaled_object(spec: Spec, prometheus_url: str) -> dict:
    """The KEDA ScaledObject alternative: KEDA queries Prometheus itself (same PromQL as the
    adapter rules) and drives its own HPA against the LLMService's scale subresource. KEDA also
    scales to and from zero itself (`minReplicas: 0`), which the HPA does only behind a feature
    gate."""
    scaling = spec.autoscaling
    metric = METRICS[scaling.metric]
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": _metadata(spec, spec.name, spec.version, STABLE),
        "spec": {
            "scaleTargetRef": _scale_target(spec),
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            # Only used for the last step to zero: as long as the scale-down window.
            "cooldownPeriod": int(scaling.scale_down_window),
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(scaling)}},
            "triggers": [{
                "type": "prometheus",
                "metricType": "AverageValue" if metric.per_pod else "Value",
                "metadata": {
                    "serverAddress": prometheus_url,
                    "query": service_query(metric, spec.namespace, spec.name),
                    "threshold": _decimal(scaling.target),
                },
            }],
        },
    }


class AutoscalerUnavailable(Exception):
    """The spec asks for an autoscaler this operator cannot build; the message says what to set."""


def autoscaler(spec: Spec, prometheus_url: str) -> dict | None:
    """The autoscaler child the spec asks for (HPA or ScaledObject), or None without autoscaling."""
    if spec.autoscaling is None:
        return None
    if spec.autoscaling.engine == KEDA:
        if not prometheus_url:
            raise AutoscalerUnavailable(
                "spec.autoscaling.engine is keda, but the operator has no Prometheus address for its "
                "trigger: set the chart value prometheus.url (operator flag --prometheus-url)")
        return scaled_object(spec, prometheus_url)
    return horizontal_pod_autoscaler(spec)


def rejection(spec: Spec, message: str) -> str:
    """Why the API server refused the autoscaler, with what to do about the usual cause."""
    scaling = spec.autoscaling
    if scaling.engine == KEDA and "could not find the requested resource" in message:
        return f"{message}: KEDA is not installed in this cluster (no {KEDA_API_VERSION} ScaledObject API); " \
               "install KEDA or use spec.autoscaling.engine hpa"
    if scaling.engine == HPA and scaling.min_replicas == 0:
        return f"{message}: minReplicas 0 needs the HPAScaleToZero feature gate on kube-apiserver and " \
               "kube-controller-manager, or spec.autoscaling.engine keda (docs/autoscaling.md#scale-to-zero)"
    return message


def ready_floor(spec: Spec) -> int:
    """Ready replicas needed for the LLMService to count as Ready.

    Without autoscaling: all of `spec.replicas`. With it, the autoscaler moves `spec.replicas`
    with the load, and a service serving at its floor while new GPU pods start is Ready (and
    Progressing), not NotReady at every scale-up.
    """
    if spec.autoscaling is None:
        return spec.replicas
    return min(spec.replicas, max(1, spec.autoscaling.min_replicas))


# ScalingActive=False reasons that are no failure: the HPA pauses while someone scaled to 0 by hand.
_DELIBERATE = frozenset({"ScalingDisabled"})


def observe(spec: Spec, hpa: dict | None) -> tuple[dict | None, tuple[str, str] | None]:
    """`status.autoscaling` and, when the autoscaler cannot work, a (reason, message) for Degraded.

    Only values that change when something happens are mirrored (desired replicas, why scaling is
    limited or failing), never the current metric value, which moves on every HPA sync and would
    cost a status write each time; `kubectl get hpa <name>` shows it.
    """
    scaling = spec.autoscaling
    if scaling is None:
        return None, None
    metric = METRICS[scaling.metric]
    block = {"engine": scaling.engine, "metric": metric.name, "target": scaling.target,
             "minReplicas": scaling.min_replicas, "maxReplicas": scaling.max_replicas}
    if scaling.engine == KEDA:
        block["name"] = f"keda-hpa-{spec.name}"  # the HPA KEDA creates for the ScaledObject
        return block, None
    block["name"] = spec.name
    if hpa is None:
        return block, None
    status = hpa.get("status") or {}
    if "desiredReplicas" in status:
        block["desiredReplicas"] = status["desiredReplicas"]
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    able, active, limited = (conds.get(t) or {} for t in ("AbleToScale", "ScalingActive", "ScalingLimited"))
    if able.get("status") == "False":
        return {**block, "message": able.get("message", "")}, (
            "AutoscalerFailing", f"HorizontalPodAutoscaler {spec.name} cannot scale: {able.get('message', '')}")
    if active.get("status") == "False":
        block["message"] = active.get("message", "")
        if active.get("reason") not in _DELIBERATE:
            return block, ("MetricsUnavailable",
                           f"HorizontalPodAutoscaler {spec.name} cannot read {metric.name} "
                           f"({active.get('reason')}): {active.get('message', '')}; see docs/autoscaling.md")
    elif limited.get("status") == "True":
        block["message"] = limited.get("message", "")
    return block, None
