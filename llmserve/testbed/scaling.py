"""The autoscaling path on a test bed, shared by the end-to-end test and `bench/autoscaling.py`.

Real parts only: a tritonserver under load, Prometheus scraping it with the labels in-cluster
relabeling gives the pods of the LLMService, prometheus-adapter (the chart's rules) serving the
custom metrics API, kube-controller-manager's HPA controller, the operator, the scheduler and
KWOK's GPU nodes. The pods are simulated, so the one tritonserver stands for the service's first
pod: the load on it is the load on the service.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass

import yaml

from .local_operator import CHART_DIR
from ..operator.spec import LABEL_SERVICE, LABEL_TRACK
from .cluster import TestBed
from .metrics_adapter import NAMESPACE as ADAPTER_NAMESPACE
from .prometheus import metric_labels
from .storage import MODEL_CLAIM
from .toolchain import KUBERNETES_VERSION

MODEL = "fixed_latency"  # tests/data/model_repo/fixed_latency: constant service time per request
MODEL_INPUTS = [{"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]


def chart_adapter_config(bed: TestBed) -> str:
    """The prometheus-adapter configuration as the chart ships it: render the chart's ConfigMap
    (`prometheusAdapter.rules.create=true`), apply it in the adapter's namespace, and read it back
    from the cluster, as the adapter's volume mount would."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values:
        yaml.safe_dump({"prometheusAdapter": {"rules": {"create": True, "namespace": ADAPTER_NAMESPACE}}}, values)
        values.flush()
        rendered = bed.helm("template", "llmserve", str(CHART_DIR), "--values", values.name,
                            "--kube-version", KUBERNETES_VERSION,
                            "--show-only", "templates/prometheus-adapter-config.yaml").stdout
    configmap = yaml.safe_load(rendered)
    bed.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ADAPTER_NAMESPACE}}, configmap)
    stored = json.loads(bed.kubectl("get", "configmap", configmap["metadata"]["name"], "-n", ADAPTER_NAMESPACE,
                                    "-o", "json").stdout)
    return stored["data"]["config.yaml"]


def llmservice(name: str, namespace: str, *, min_replicas: int, max_replicas: int,
               target: str = "1", scale_up: str = "0s", scale_down: str = "5m", gpus: int = 1,
               node_selector: dict | None = None, repository: str = f"pvc://{MODEL_CLAIM}") -> dict:
    """An autoscaled LLMService serving the test model from the namespace's model repository
    claim (llmserve.testbed.storage; the pods are simulated, so nothing reads it)."""
    runtime = {"gpus": gpus, **({"nodeSelector": node_selector} if node_selector else {})}
    return {
        "apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": MODEL, "repository": repository, "version": 1},
            "runtime": runtime,
            "autoscaling": {"minReplicas": min_replicas, "maxReplicas": max_replicas, "target": target,
                            "scaleUp": {"stabilizationWindow": scale_up},
                            "scaleDown": {"stabilizationWindow": scale_down}},
        },
    }


def triton_target(metrics_target: str, namespace: str, pod: dict) -> dict:
    """A Prometheus target for a local tritonserver labeled as the pod `pod` would be in the
    cluster: Kubernetes service discovery's `namespace` and `pod`, and the pod labels through
    `labelmap` (docs/autoscaling.md#prometheus)."""
    labels = {**metric_labels(pod["metadata"]["labels"]), "namespace": namespace, "pod": pod["metadata"]["name"]}
    return {"target": metrics_target, "labels": labels}


@dataclass(frozen=True)
class Snapshot:
    """One LLMService and its scaling children as the API server has them now."""

    llmservice: dict
    hpa: dict | None
    deployments: list[dict]

    @property
    def replicas(self) -> int:
        """spec.replicas: what the HPA last wrote through the scale subresource."""
        return self.llmservice["spec"].get("replicas", 1)

    @property
    def reported_replicas(self) -> int | None:
        """status.replicas: what the operator last reported (through the scale subresource)."""
        return (self.llmservice.get("status") or {}).get("replicas")

    @property
    def hpa_desired(self) -> int | None:
        return ((self.hpa or {}).get("status") or {}).get("desiredReplicas")

    def hpa_condition(self, type_: str) -> dict:
        conds = ((self.hpa or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c.get("type") == type_), {})

    def track(self, name: str) -> int:
        """spec.replicas of the Deployment serving track `name` (stable or canary), 0 without one."""
        return sum(d["spec"].get("replicas", 0) for d in self.deployments
                   if (d["metadata"].get("labels") or {}).get(LABEL_TRACK) == name)

    @property
    def deployment_replicas(self) -> int:
        return sum(d["spec"].get("replicas", 0) for d in self.deployments)

    @property
    def ready_pods(self) -> int:
        return sum((d.get("status") or {}).get("readyReplicas", 0) for d in self.deployments)

    @property
    def pods(self) -> int:
        return sum((d.get("status") or {}).get("replicas", 0) for d in self.deployments)

    def explain(self) -> str:
        """What a person debugging a stuck scale would look at first."""
        hpa = {t: (c.get("status"), c.get("reason"), c.get("message"))
               for t in ("AbleToScale", "ScalingActive", "ScalingLimited") if (c := self.hpa_condition(t))}
        return (f"spec.replicas={self.replicas} status.replicas={self.reported_replicas} "
                f"HPA desired={self.hpa_desired} stable={self.track('stable')} canary={self.track('canary')} "
                f"pods={self.pods} ready={self.ready_pods}\nHPA conditions: {hpa}\n"
                f"LLMService conditions: {(self.llmservice.get('status') or {}).get('conditions')}")

    def condition(self, type_: str) -> dict:
        conds = (self.llmservice.get("status") or {}).get("conditions") or []
        return next((c for c in conds if c.get("type") == type_), {})


def snapshot(bed: TestBed, namespace: str, name: str) -> Snapshot:
    """One request: the LLMService, its HPA and its Deployments."""
    items = json.loads(bed.kubectl("get", "llmservices,horizontalpodautoscalers,deployments", "-n", namespace,
                                   "-o", "json").stdout)["items"]
    ours = [i for i in items if i["metadata"]["name"] == name
            or (i["metadata"].get("labels") or {}).get(LABEL_SERVICE) == name]
    by_kind = {kind: [i for i in ours if i["kind"] == kind]
               for kind in ("LLMService", "HorizontalPodAutoscaler", "Deployment")}
    if not by_kind["LLMService"]:
        raise LookupError(f"LLMService {namespace}/{name} does not exist")
    return Snapshot(by_kind["LLMService"][0], next(iter(by_kind["HorizontalPodAutoscaler"]), None),
                    by_kind["Deployment"])


def first_pod(bed: TestBed, namespace: str, name: str) -> dict | None:
    """A Ready pod of the LLMService, or None yet."""
    pods = json.loads(bed.kubectl("get", "pods", "-n", namespace, "-l", f"{LABEL_SERVICE}={name}",
                                  "-o", "json").stdout)["items"]
    ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                    for c in (p.get("status") or {}).get("conditions") or [])]
    return min(ready, key=lambda p: p["metadata"]["name"]) if ready else None

