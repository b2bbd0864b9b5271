"""prometheus-adapter, built from the Go module proxy, serving the custom metrics API of a test bed.

In a cluster the adapter is a Deployment behind a Service that an APIService registers as
`v1beta1.custom.metrics.k8s.io`: the API server's aggregator proxies `/apis/custom.metrics.k8s.io/`
to it with its front-proxy client certificate, and the adapter authenticates the proxy and asks the
API server whether the original caller (the HPA controller) may read the metric (delegated
authentication and authorization). Here every part of that path is real and only the process
location differs: the adapter runs on this machine, as a ServiceAccount with the RBAC the upstream
manifests grant, and the APIService points at a Service of type ExternalName `localhost`.
Endpoints cannot hold loopback addresses, so an ExternalName is the one Service a local process
can stand behind; the aggregator dials `localhost:<port>` and verifies the adapter's certificate
(signed by the test bed's CA) for `prometheus-adapter.monitoring.svc`.

The rules come from the caller (the chart's ConfigMap, so tests exercise what the chart ships).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from . import pki, toolchain
from .cluster import TestBed
from .procs import LocalServer

NAMESPACE = "monitoring"
NAME = "prometheus-adapter"
GROUP, VERSION = "custom.metrics.k8s.io", "v1beta1"
APISERVICE = f"{VERSION}.{GROUP}"


def manifests(port: int, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Namespace, ServiceAccount, RBAC, the ExternalName Service and the APIService."""
    subject = [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, "namespace": NAMESPACE}},
        # Delegated authentication (TokenReview) and authorization (SubjectAccessReview).
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"{NAME}:system:auth-delegator"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
         "subjects": subject},
        # The front-proxy CA and allowed names the API server publishes in kube-system.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": f"{NAME}-auth-reader", "namespace": "kube-system"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "extension-apiserver-authentication-reader"},
         "subjects": subject},
        # Objects the metrics describe; the adapter lists them for selector queries.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": f"{NAME}-resource-reader"},
         "rules": [{"apiGroups": [""], "resources": ["namespaces", "pods", "services"],
                    "verbs": ["get", "list", "watch"]},
                   {"apiGroups": ["llmserve.io"], "resources": ["llmservices"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"{NAME}-resource-reader"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": f"{NAME}-resource-reader"},
         "subjects": subject},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": NAME, "namespace": NAMESPACE},
         "spec": {"type": "ExternalName", "externalName": "localhost",
                  "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": APISERVICE},
         "spec": {"group": GROUP, "version": VERSION, "groupPriorityMinimum": 100, "versionPriority": 100,
                  "service": {"name": NAME, "namespace": NAMESPACE, "port": port},
                  "caBundle": base64.b64encode(ca_bundle).decode()}},
    ]


class MetricsAdapterError(RuntimeError):
    """The adapter did not start or the API server cannot reach it; the message has its log tail."""


class MetricsAdapter(LocalServer):
    """One local prometheus-adapter registered as the test bed's custom metrics API.

    `relist_interval` is how often the adapter rediscovers which series exist (a new LLMService's
    metrics appear within it); queries for values always go to Prometheus live.
    """

    what, log_name, error = "the adapter", "prometheus-adapter.log", MetricsAdapterError
    workdir_prefix = "llmserve-prometheus-adapter-"

    def __init__(self, cluster: TestBed, prometheus_url: str, config: str, *, relist_interval: str = "5s",
                 startup_timeout: float = 90.0):
        self.cluster, self.prometheus_url, self.config = cluster, prometheus_url, config
        self.relist_interval, self.startup_timeout = relist_interval, startup_timeout
        super().__init__()

    def _command(self, workdir: Path) -> tuple[list[str], None]:
        from .local_operator import service_account_kubeconfig

        toolchain.build(toolchain.PROMETHEUS_ADAPTER)
        (self.port,) = self.pick_ports(1)
        self.cluster.apply(*manifests(self.port, (self.cluster.dir / "pki" / "ca.crt").read_bytes()))
        kubeconfig = service_account_kubeconfig(self.cluster, workdir / "kubeconfig", NAMESPACE, NAME)
        cert, key = pki.serving_certificate(self.cluster.dir / "pki", workdir / "serving", [
            f"{NAME}.{NAMESPACE}.svc", f"{NAME}.{NAMESPACE}.svc.cluster.local", "localhost"])
        config = workdir / "config.yaml"
        config.write_text(self.config)
        return [
            str(toolchain.PROMETHEUS_ADAPTER.path("prometheus-adapter")),
            f"--secure-port={self.port}", "--bind-address=127.0.0.1",
            f"--tls-cert-file={cert}", f"--tls-private-key-file={key}",
            f"--lister-kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--prometheus-url={self.prometheus_url}", f"--config={config}",
            # Discovery looks for series seen within max-age (default: one relist interval);
            # a minute rides out a few slow scrapes on a busy machine instead of dropping the
            # metric until the next relist.
            f"--metrics-relist-interval={self.relist_interval}", "--metrics-max-age=1m", "--v=2",
        ], None

    def _wait_ready(self) -> None:
        """Until the aggregator reports the APIService Available (it reached the adapter through
        the Service, verified its certificate and read its discovery document)."""
        deadline = time.monotonic() + self.startup_timeout
        condition: dict = {}
        while time.monotonic() < deadline:
            self._raise_if_failed("before its APIService was Available")
            found = self.cluster.kubectl("get", "apiservice", APISERVICE, "-o", "json", check=False)
            if found.returncode == 0:
                conds = json.loads(found.stdout).get("status", {}).get("conditions", [])
                condition = next((c for c in conds if c.get("type") == "Available"), {})
                if condition.get("status") == "True":
                    return
            time.sleep(0.5)
        raise MetricsAdapterError(f"APIService {APISERVICE} not Available after {self.startup_timeout:.0f}s "
                                  f"({condition.get('reason')}: {condition.get('message')});\n"
                                  f"adapter log:\n{self.log_tail()}")

    def get(self, path: str) -> dict:
        """GET a custom metrics API path through the API server, e.g. `namespaces/ns/llmservices.
        llmserve.io/chat/llmserve_queue_compute_ratio`."""
        return json.loads(self.cluster.kubectl("get", "--raw", f"/apis/{GROUP}/{VERSION}/{path}").stdout)

    def object_metric(self, namespace: str, resource: str, name: str, metric: str) -> dict:
        """The MetricValue of one object (`resource` as `llmservices.llmserve.io`), as the HPA
        controller reads it for an Object metric."""
        [item] = self.get(f"namespaces/{namespace}/{resource}/{name}/{metric}")["items"]
        return item

    def metric_names(self) -> set[str]:
        """`<resource>/<metric>` of every metric the adapter has discovered so far."""
        return {r["name"] for r in self.get("").get("resources", [])}

    def stop(self) -> None:
        """Unregister first (an APIService whose server is gone breaks discovery for every client
        and blocks namespace deletion), then stop the process and remove its files."""
        if self._workdir is not None:
            self.cluster.kubectl("delete", "apiservice", APISERVICE, "--ignore-not-found", check=False)
        super().stop()
