"""What a tenant may not write into an LLMService (issue 11, items 9-11), refused by the real API
server with a message naming the field, before the operator sees the object; what the tenant may
write (every pass-through field at once) still accepted; and the model repository reaching pods
only through a PersistentVolumeClaim, never a host path.

The catalogue runs `kubectl create --dry-run=server` against the CRD the chart installed (the test
bed's chart allows the loopback Prometheus origin, as `install_chart` sets it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.operator import get_json, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
NODE_TERMS = ("spec.runtime.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
              ".nodeSelectorTerms[0]")


def manifest(name="valid", namespace="default"):
    return {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"name": "tiny-gpt", "repository": "pvc://models", "version": 1},
                     "replicas": 1, "runtime": {"gpus": 1, "startupTimeout": "2m"}}}


def with_field(path, value):
    obj = manifest()
    *parents, leaf = path
    target = obj
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = value
    return obj


def node_affinity(requirement):
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [requirement]}]}}}


RUNTIME, MODEL = ("spec", "runtime"), ("spec", "model")
REFUSED = [
    # (id, path, value, substrings of the API server's message: the field and the rule)
    # 9. host paths and path traversal
    ("repository-host-path", MODEL + ("repository",), "file:///var/lib/llmserve/model_repo",
     ["spec.model.repository", "host paths such as file:// are not allowed"]),
    ("repository-traversal", MODEL + ("repository",), "pvc://models/../../etc",
     ["spec.model.repository", "must not contain '.' or '..' path segments"]),
    ("repository-trailing-dotdot", MODEL + ("repository",), "pvc://models/model_repo/..",
     ["spec.model.repository", "must not contain '.' or '..' path segments"]),
    ("repository-claim-not-a-name", MODEL + ("repository",), "pvc://Models_1/repo",
     ["spec.model.repository", "must be pvc://<claim>/<path>"]),
    ("model-name-traversal", MODEL + ("name",), "../../etc/passwd",
     ["spec.model.name", "must be a model directory name"]),
    ("model-name-path", MODEL + ("name",), "tiny/../../x", ["spec.model.name", "must be a model directory name"]),
    # 10. URLs the operator would fetch
    ("prometheus-metadata-endpoint", ("spec", "rollout"),
     {"analysis": {"prometheus": {"url": "http://169.254.169.254/latest/meta-data"}}},
     ["spec.rollout.analysis.prometheus.url", "the operator fetches no other URL"]),
    ("prometheus-userinfo", ("spec", "rollout"),
     {"analysis": {"prometheus": {"url": "http://admin:secret@127.0.0.1:9090"}}},
     ["spec.rollout.analysis.prometheus.url", "the operator fetches no other URL"]),
    ("prometheus-lookalike-host", ("spec", "rollout"),
     {"analysis": {"prometheus": {"url": "http://127.0.0.1.nip.io:9090"}}},
     ["spec.rollout.analysis.prometheus.url", "the operator fetches no other URL"]),
    # 11. pass-through fields, validated as the core API validates them
    ("gpu-resource-unqualified", RUNTIME + ("gpuResourceName",), "gpu",
     ["spec.runtime.gpuResourceName", "must be an extended resource name"]),
    ("gpu-resource-kubernetes-io", RUNTIME + ("gpuResourceName",), "kubernetes.io/gpu",
     ["spec.runtime.gpuResourceName", "must be an extended resource name"]),
    ("requests-above-limits", RUNTIME + ("resources",), {"requests": {"memory": "8Gi"}, "limits": {"memory": "4Gi"}},
     ["spec.runtime.resources", "requests must not exceed limits"]),
    ("negative-quantity", RUNTIME + ("resources",), {"requests": {"cpu": "-500m"}},
     ["spec.runtime.resources.requests.cpu", "should match"]),
    ("negative-integer-quantity", RUNTIME + ("resources",), {"limits": {"memory": -1}},
     ["spec.runtime.resources.limits.memory", "greater than or equal to 0"]),
    ("resource-name-unknown", RUNTIME + ("resources",), {"requests": {"gpus": "1"}},
     ["spec.runtime.resources", "resource names must be cpu, memory"]),
    ("predictor-requests-above-limits", ("spec", "predictor"),
     {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}},
     ["spec.predictor.resources", "requests must not exceed limits"]),
    ("toleration-exists-with-value", RUNTIME + ("tolerations",), [{"key": "gpu", "operator": "Exists", "value": "x"}],
     ["spec.runtime.tolerations[0].value", "must be empty when operator is Exists"]),
    ("toleration-empty-key-equal", RUNTIME + ("tolerations",), [{"operator": "Equal", "value": "x"}],
     ["spec.runtime.tolerations[0].operator", "operator must be Exists when key is empty"]),
    ("toleration-seconds-without-noexecute", RUNTIME + ("tolerations",),
     [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}],
     ["spec.runtime.tolerations[0].tolerationSeconds", "needs effect NoExecute"]),
    ("toleration-key-not-qualified", RUNTIME + ("tolerations",), [{"key": "bad key!", "operator": "Exists"}],
     ["spec.runtime.tolerations[0].key", "must be a qualified name"]),
    ("toleration-effect", RUNTIME + ("tolerations",), [{"key": "gpu", "operator": "Exists", "effect": "Never"}],
     ["spec.runtime.tolerations[0].effect", "Unsupported value"]),
    ("too-many-tolerations", RUNTIME + ("tolerations",), [{"key": f"k{i}", "operator": "Exists"} for i in range(33)],
     ["spec.runtime.tolerations", "must have at most 32 items"]),
    ("affinity-operator", RUNTIME + ("affinity",), node_affinity({"key": "zone", "operator": "Near", "values": ["a"]}),
     [f"{NODE_TERMS}.matchExpressions[0].operator", "Unsupported value"]),
    ("affinity-in-without-values", RUNTIME + ("affinity",), node_affinity({"key": "zone", "operator": "In"}),
     [f"{NODE_TERMS}.matchExpressions[0].values", "must be non-empty for In and NotIn"]),
    ("affinity-gt-not-integer", RUNTIME + ("affinity",),
     node_affinity({"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["lots"]}),
     [f"{NODE_TERMS}.matchExpressions[0].values", "one integer for Gt and Lt"]),
    ("affinity-weight-zero", RUNTIME + ("affinity",), {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 0, "preference": {"matchExpressions": [{"key": "zone", "operator": "Exists"}]}}]}},
     ["spec.runtime.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight",
      "greater than or equal to 1"]),
    ("affinity-unknown-field", RUNTIME + ("affinity",), {"nodeAffinity": {"requiredDuringScheduling": {}}},
     ['unknown field "spec.runtime.affinity.nodeAffinity.requiredDuringScheduling"']),
    ("anti-affinity-without-topology-key", RUNTIME + ("affinity",), {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "chat"}}}]}},
     ["spec.runtime.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
      "Required value"]),
    ("node-selector-key", RUNTIME + ("nodeSelector",), {"bad key": "x"},
     ["spec.runtime.nodeSelector", "keys must be label keys"]),
    ("node-selector-value", RUNTIME + ("nodeSelector",), {"nvidia.com/gpu.product": "A100 80GB"},
     ["spec.runtime.nodeSelector", "values label values"]),
    ("image-uppercase-path", RUNTIME + ("image",), "registry.example.com/Team/tritonserver:25.08",
     ["spec.runtime.image", "must be an image reference"]),
    ("image-with-space", RUNTIME + ("image",), "tritonserver 25.08", ["spec.runtime.image", "must be an image reference"]),
    ("predictor-image-bad-digest", ("spec", "predictor"), {"image": "llmserve/predictor@sha256:abc"},
     ["spec.predictor.image", "must be an image reference"]),
    ("pull-secret-name", RUNTIME + ("imagePullSecrets",), [{"name": "My_Secret"}],
     ["spec.runtime.imagePullSecrets[0].name", "must be a Secret name"]),
    ("pull-secret-without-name", RUNTIME + ("imagePullSecrets",), [{}],
     ["spec.runtime.imagePullSecrets[0].name", "Required value"]),
    ("gateway-name", ("spec", "rollout"), {"traffic": {"gatewayRef": {"name": "Inference_GW"}}},
     ["spec.rollout.traffic.gatewayRef.name", "must be a Gateway name"]),
    ("gateway-namespace", ("spec", "rollout"), {"traffic": {"gatewayRef": {"name": "gw", "namespace": "team.a"}}},
     ["spec.rollout.traffic.gatewayRef.namespace", "must be a namespace name"]),
    ("shm-size-unbounded", RUNTIME + ("shmSize",), "1Ti", ["spec.runtime.shmSize", "at most 64Gi"]),
]


def dry_run(testbed, obj):
    return testbed.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(obj), check=False)


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_hostile_and_malformed_specs_are_refused_naming_the_field(testbed, llmserve_chart, case):
    _, path, value, expected = case
    result = dry_run(testbed, with_field(path, value))
    assert result.returncode != 0, f"accepted: {path} = {value}"
    for text in expected:
        assert text in result.stderr, result.stderr


EVERY_PASS_THROUGH_FIELD = {
    "image": "registry.example.com:5000/nvidia/tritonserver:25.08-vllm-python-py3",
    "gpuResourceName": "amd.com/gpu",
    "resources": {"requests": {"cpu": "4", "memory": "32Gi", "ephemeral-storage": "10Gi", "hugepages-2Mi": "1Gi",
                               "example.com/foo": 1},
                  "limits": {"cpu": 8, "memory": "48Gi", "hugepages-2Mi": "1Gi", "example.com/foo": "1"}},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "kubernetes.io/os": "linux"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoExecute",
                     "tolerationSeconds": 300},
                    {"operator": "Exists"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40000"]},
                                      {"key": "zone", "operator": "In", "values": ["a", "b"]}],
                 "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["gpu-node-9"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "preference": {"matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}]}}]},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname", "namespaces": ["team-a"],
            "labelSelector": {"matchLabels": {"llmserve.io/service": "chat"},
                              "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}]}}}]},
    },
    "imagePullSecrets": [{"name": "nvcr-io"}, {"name": "registry.example.com"}],
    "shmSize": "64Gi",
}


def test_every_pass_through_field_at_once_is_accepted(testbed, llmserve_chart):
    """The validation is no stricter than the core API: a spec a pod would accept is accepted."""
    obj = manifest()
    obj["spec"]["runtime"] = {**obj["spec"]["runtime"], **EVERY_PASS_THROUGH_FIELD}
    obj["spec"]["predictor"] = {"image": "llmserve/predictor@sha256:" + "a" * 64,
                                "resources": {"requests": {"cpu": "500m"}, "limits": {"cpu": "1", "memory": "1Gi"}}}
    obj["spec"]["rollout"] = {"analysis": {"prometheus": {"url": "http://127.0.0.1:39090/prometheus"}},
                              "traffic": {"gatewayRef": {"name": "inference-gw", "namespace": "gateways",
                                                         "sectionName": "https"}}}
    obj["spec"]["model"]["repository"] = "pvc://models.team-a/model_repo/v.2_final"
    result = dry_run(testbed, obj)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_are_accepted(testbed, llmserve_chart, example):
    for obj in yaml.safe_load_all(example.read_text()):
        obj["metadata"]["namespace"] = "default"
        result = dry_run(testbed, obj)
        assert result.returncode == 0, result.stderr


def test_the_model_repository_reaches_pods_through_the_bound_claim_only(testbed, operator, namespace):
    """The test bed's repository is an administrator's PersistentVolume and a claim bound to it;
    the pods mount the claim read-only and nothing of the host."""
    claim = get_json(testbed, "pvc", "models", "-n", namespace)
    assert claim["status"]["phase"] == "Bound"
    assert get_json(testbed, "pv", claim["spec"]["volumeName"])["status"]["phase"] == "Bound"

    testbed.apply(manifest("mounted", namespace))
    testbed.kubectl("wait", "--for=condition=Ready", "llms/mounted", "-n", namespace, "--timeout=180s", timeout=210)
    [pod] = wait_for(lambda: get_json(testbed, "pods", "-n", namespace, "-l", "llmserve.io/service=mounted")["items"],
                     "the pod")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["repository"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert not any("hostPath" in v for v in volumes.values())
    assert pod["spec"]["nodeName"]  # scheduled: the scheduler's volume binding found the claim bound


def test_the_embedded_core_schemas_match_what_the_api_server_serves(testbed, tmp_path):
    """charts/llmserve/files/core-v1-schemas.yaml is what hack/crd_core_schemas.py makes of the
    core/v1 OpenAPI schema this very kube-apiserver serves."""
    openapi = tmp_path / "api__v1_openapi.json"
    openapi.write_text(testbed.kubectl("get", "--raw", "/openapi/v3/api/v1").stdout)
    check = subprocess.run([sys.executable, str(ROOT / "hack" / "crd_core_schemas.py"), "--openapi", str(openapi),
                            "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    json.loads(openapi.read_text())  # and it was JSON, not an error page

