"""The LeaderWorkerSet controller, built from its Go module, running against a test bed.

Multi-node LLMServices render LeaderWorkerSets (docs/distributed.md); on the test bed the real
upstream controller (`sigs.k8s.io/lws`, toolchain.LWS) turns them into leader and worker
StatefulSets, whose pods the real scheduler places on KWOK GPU nodes. Everything it installs comes
from the module's own `config/` directory in the Go module cache (the CRD, the manager's
ClusterRole, the webhook configurations with the objectSelector patches its kustomization applies),
so the test bed runs what a `kubectl apply` of the release would.

Its webhooks are not optional: the pod webhook labels each worker with its index and injects
`LWS_LEADER_ADDRESS` / `LWS_WORKER_INDEX` / `LWS_GROUP_SIZE`, which the rendered worker command
uses. They are served like prometheus-adapter's API (metrics_adapter.py): the process listens on
loopback with a certificate the test bed's CA signed for the webhook Service's DNS name, and that
Service is an ExternalName `localhost`, so the API server's own service resolution and TLS
verification are exercised. The controller's internal certificate rotation is switched off (it
would write a Secret and patch the webhooks itself) and so is leader election (one process).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
import yaml

from . import pki, toolchain
from .cluster import TestBed
from .procs import LocalServer
from .waiting import poll

NAMESPACE = "lws-system"
NAME = "lws-controller-manager"
WEBHOOK_SERVICE = "lws-webhook-service"
CRD_NAME = "leaderworkersets.leaderworkerset.x-k8s.io"
# The names the release's kustomization gives the webhook configurations (namePrefix `lws-`).
MUTATING, VALIDATING = "lws-mutating-webhook-configuration", "lws-validating-webhook-configuration"


def module_dir() -> Path:
    """The LWS module's source in the Go module cache (downloaded by the build)."""
    gomodcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
    path = Path(gomodcache) / "sigs.k8s.io" / f"lws@{toolchain.LWS_VERSION}"
    if not (path / "config").is_dir():
        raise LWSError(f"{path} is missing: build the controller first (toolchain.build(toolchain.LWS))")
    return path


def apply_replace_patches(document: dict, patch: list[dict]) -> dict:
    """Apply the `op: replace` JSON patches of the release's webhook kustomization."""
    out = copy.deepcopy(document)
    for op in patch:
        if op["op"] != "replace":
            raise LWSError(f"unexpected patch operation {op!r}")
        *parents, last = op["path"].strip("/").split("/")
        target = out
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[int(last) if isinstance(target, list) else last] = op["value"]
    return out


def webhook_configurations(config: Path, port: int, ca_bundle: bytes) -> list[dict]:
    """The mutating and validating webhook configurations of `config/webhook`, patched as the
    release patches them, pointing at the ExternalName Service on `port`."""
    docs = [d for d in yaml.safe_load_all((config / "webhook" / "manifests.yaml").read_text()) if d]
    patches = {"MutatingWebhookConfiguration": "mutating-patch.yaml",
               "ValidatingWebhookConfiguration": "validating-patch.yaml"}
    names = {"MutatingWebhookConfiguration": MUTATING, "ValidatingWebhookConfiguration": VALIDATING}
    out = []
    for doc in docs:
        doc = apply_replace_patches(doc, yaml.safe_load((config / "webhook" / patches[doc["kind"]]).read_text()))
        doc["metadata"] = {"name": names[doc["kind"]]}
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"service": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE, "path": path,
                                                "port": port},
                                    "caBundle": base64.b64encode(ca_bundle).decode()}
        out.append(doc)
    return out


def manifests(config: Path, port: int, ca_bundle: bytes) -> list[dict]:
    """Namespace, ServiceAccount, the manager's ClusterRole and binding, the webhook Service and
    the webhook configurations (the CRD is applied separately: it is too large for client-side
    apply's annotation)."""
    role = yaml.safe_load((config / "rbac" / "role.yaml").read_text())
    role["metadata"] = {"name": "lws-manager-role"}
    subject = [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, "namespace": NAMESPACE}},
        role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "lws-manager-rolebinding"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "lws-manager-role"},
         "subjects": subject},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE},
         "spec": {"type": "ExternalName", "externalName": "localhost",
                  "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}},
        *webhook_configurations(config, port, ca_bundle),
    ]


def controller_config(webhook_port: int, health_port: int, cert_dir: Path) -> dict:
    """The controller's Configuration file: loopback webhook server with our certificate, no
    leader election, no internal certificate management, no metrics server."""
    return {
        "apiVersion": "config.lws.x-k8s.io/v1alpha1", "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
    }


class LWSError(RuntimeError):
    """The controller did not start or its webhooks are unreachable; the message has its log tail."""


class LWSController(LocalServer):
    """One local LeaderWorkerSet controller (with webhooks) serving a test bed."""

    what, log_name, error = "the LeaderWorkerSet controller", "lws-controller.log", LWSError
    workdir_prefix = "llmserve-lws-"

    def __init__(self, cluster: TestBed, *, startup_timeout: float = 120.0):
        self.cluster, self.startup_timeout = cluster, startup_timeout
        self.health_port = 0
        super().__init__()

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        from .local_operator import service_account_kubeconfig

        toolchain.build(toolchain.LWS)
        config = module_dir() / "config"
        self.port, self.health_port = self.pick_ports(2)
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                             str(config / "crd" / "bases" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"))
        poll(f"CRD {CRD_NAME} Established", self._crd_established, 60)
        self.cluster.apply(*manifests(config, self.port, (self.cluster.dir / "pki" / "ca.crt").read_bytes()))
        kubeconfig = service_account_kubeconfig(self.cluster, workdir / "kubeconfig", NAMESPACE, NAME)
        cert_dir = workdir / "certs"
        cert_dir.mkdir()
        # controller-runtime's webhook server reads tls.crt / tls.key from its certDir.
        pki.serving_certificate(self.cluster.dir / "pki", cert_dir / "tls", [
            f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc", f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc.cluster.local", "localhost"])
        config_file = workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(controller_config(self.port, self.health_port, cert_dir)))
        argv = [str(toolchain.LWS.path("lws-controller")), f"--config={config_file}", "--zap-log-level=info"]
        return argv, {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def _wait_ready(self) -> None:
        """Until the controller reports ready and the API server reaches its webhooks (a server-side
        dry run of a LeaderWorkerSet goes through the defaulting and validating webhooks)."""
        probe = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                 "metadata": {"name": "webhook-probe", "namespace": "default"},
                 "spec": {"leaderWorkerTemplate": {"size": 2, "workerTemplate": {"spec": {"containers": [
                     {"name": "c", "image": "probe"}]}}}}}
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            self._raise_if_failed("before its webhooks served")
            if self._healthy():
                result = self.cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                                              input=json.dumps(probe), check=False)
                if result.returncode == 0 and json.loads(result.stdout)["spec"].get("rolloutStrategy"):
                    return  # defaulted by the mutating webhook
                last = result.stderr.strip()
            time.sleep(0.5)
        raise LWSError(f"LeaderWorkerSet webhooks not serving after {self.startup_timeout:.0f}s ({last});\n"
                       f"controller log:\n{self.log_tail()}")

    def _crd_established(self) -> bool:
        found = self.cluster.kubectl("get", "crd", CRD_NAME, "-o",
                                     "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False)
        return found.stdout.strip() == "True"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Remove the webhook configurations first (with failurePolicy Fail, a webhook whose server
        is gone refuses every LeaderWorkerSet and LWS pod), then stop the process. The CRD stays:
        deleting it would delete every LeaderWorkerSet of the test bed."""
        if self._workdir is not None:
            for kind, name in (("mutatingwebhookconfiguration", MUTATING),
                               ("validatingwebhookconfiguration", VALIDATING)):
                self.cluster.kubectl("delete", kind, name, "--ignore-not-found", check=False)
        super().stop()
