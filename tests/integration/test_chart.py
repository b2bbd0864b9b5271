"""charts/llmserve renders cleanly with the pinned helm, in each supported configuration."""

import subprocess

import pytest
import yaml

from llmserve.testbed.local_operator import CHART_DIR
from llmserve.testbed.toolchain import HELM, KUBERNETES_VERSION

VARIANTS = {
    "defaults": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
    "no-leader-election": ["--set", "leaderElection.enabled=false"],
    "crd-deleted-on-uninstall": ["--set", "crds.keep=false"],
    "no-crd-no-rbac": ["--set", "crds.install=false", "--set", "rbac.create=false",
                       "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops"],
    "autoscaling": ["--set", "prometheusAdapter.rules.create=true", "--set", "prometheusAdapter.rules.namespace=monitoring",
                    "--set", "prometheus.url=http://prometheus-operated.monitoring.svc:9090"],
    "prometheus-allowlist": ["--set", "prometheus.url=http://prometheus-operated.monitoring.svc:9090",
                             "--set", "prometheus.allowedUrls={https://thanos.team-a.svc:10902,http://127.0.0.1}"],
}


def helm(*args):
    result = subprocess.run([str(HELM.path("helm")), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(*args):
    # helm built from source assumes Kubernetes v1.20 unless told; the chart needs >= 1.30.
    docs = yaml.safe_load_all(helm("template", "llmserve", str(CHART_DIR), "--namespace", "ops",
                                   "--kube-version", KUBERNETES_VERSION, *args))
    return {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs if d}


@pytest.mark.parametrize("args", VARIANTS.values(), ids=VARIANTS.keys())
def test_lint_strict(args):
    helm("lint", "--strict", str(CHART_DIR), *args)


def test_default_render():
    objs = render()
    kinds = sorted(k[0] for k in objs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Role",
                     "RoleBinding", "ServiceAccount"]
    crd = objs["CustomResourceDefinition", None, "llmservices.llmserve.io"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["spec"]["names"]["shortNames"] == ["llms"]
    [version] = crd["spec"]["versions"]
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")] == [
        "Ready", "Stable", "Canary", "Weight", "Replicas", "Age"]
    assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"

    pod = objs["Deployment", "ops", "llmserve"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                            "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--lease-namespace=ops" in container["args"]
    assert container["resources"]["limits"]["memory"]


def test_namespaced_install_binds_only_the_listed_namespaces():
    objs = render(*VARIANTS["namespaced"])
    assert not [k for k in objs if k[0] == "ClusterRoleBinding"]
    bindings = {k[1] for k in objs if k[0] == "RoleBinding" and k[2] == "llmserve"}
    assert bindings == {"team-a", "team-b"}
    args = objs["Deployment", "ops", "llmserve"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_crd_is_deleted_on_uninstall_only_when_asked():
    crd = render(*VARIANTS["crd-deleted-on-uninstall"])["CustomResourceDefinition", None, "llmservices.llmserve.io"]
    assert "annotations" not in crd["metadata"]


def test_values_schema_rejects_unknown_and_mistyped_values():
    for bad in (["--set", "replicaCount=two"], ["--set", "logLevel=verbose"], ["--set", "unknownKey=1"]):
        result = subprocess.run([str(HELM.path("helm")), "template", str(CHART_DIR),
                                 "--kube-version", KUBERNETES_VERSION, *bad],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "values don't meet the specifications of the schema" in result.stderr


def test_prometheus_adapter_rules_and_prometheus_url_are_opt_in():
    assert not [k for k in render() if k[0] == "ConfigMap"]
    objs = render(*VARIANTS["autoscaling"])
    rules = objs["ConfigMap", "monitoring", "llmserve-prometheus-adapter"]["data"]["config.yaml"]
    assert rules == (CHART_DIR / "files" / "prometheus-adapter.yaml").read_text()
    [container] = objs["Deployment", "ops", "llmserve"]["spec"]["template"]["spec"]["containers"]
    assert {"name": "LLMSERVE_PROMETHEUS_URL", "value": "http://prometheus-operated.monitoring.svc:9090"} in container["env"]


def test_the_per_service_prometheus_rule_and_the_operator_flags_come_from_the_same_values():
    """The CRD refuses every Prometheus URL but the operator's and the allowlisted origins, and the
    operator is told the same allowlist (it re-checks stored objects)."""
    objs = render(*VARIANTS["prometheus-allowlist"])
    crd = objs["CustomResourceDefinition", None, "llmservices.llmserve.io"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    [rule] = spec["rollout"]["properties"]["analysis"]["properties"]["prometheus"]["properties"]["url"][
        "x-kubernetes-validations"]
    assert rule["rule"] == (
        "isURL(self) && !self.matches('^[^/]*//[^/]*@') && ("
        "(url(self).getScheme() == 'http' && url(self).getHost() == 'prometheus-operated.monitoring.svc:9090') || "
        "(url(self).getScheme() == 'https' && url(self).getHost() == 'thanos.team-a.svc:10902') || "
        "(url(self).getScheme() == 'http' && url(self).getHostname() == '127.0.0.1'))")
    assert "http://127.0.0.1:<any port>" in rule["message"]
    [container] = objs["Deployment", "ops", "llmserve"]["spec"]["template"]["spec"]["containers"]
    assert [a for a in container["args"] if a.startswith("--prometheus-allowed-url")] == [
        "--prometheus-allowed-url=https://thanos.team-a.svc:10902", "--prometheus-allowed-url=http://127.0.0.1"]
    default_rule = render()["CustomResourceDefinition", None, "llmservices.llmserve.io"]["spec"]["versions"][0][
        "schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rollout"]["properties"]["analysis"][
        "properties"]["prometheus"]["properties"]["url"]["x-kubernetes-validations"][0]
    assert default_rule["rule"].endswith("&& (false)")  # no Prometheus configured: none may be named


def test_two_operators_never_act_at_once():
    """With election an upgrade's new pod stands by until the old one releases the lease; without
    it the old pod goes first (Recreate) and more than one replica is refused."""
    elected = render("--set", "replicaCount=2")["Deployment", "ops", "llmserve"]["spec"]["strategy"]
    assert elected == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    alone = render(*VARIANTS["no-leader-election"])["Deployment", "ops", "llmserve"]["spec"]["strategy"]
    assert alone == {"type": "Recreate"}
    result = subprocess.run([str(HELM.path("helm")), "template", str(CHART_DIR), "--kube-version", KUBERNETES_VERSION,
                             *VARIANTS["no-leader-election"], "--set", "replicaCount=2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "/replicaCount" in result.stderr and "maximum" in result.stderr
