"""Install the chart and run the operator as a local process, with the chart's own permissions.

The end-to-end tests, the fleet benchmark and the quickstart run the operator this way against
the test bed (whose pods are simulated, so the chart's operator pod would not run anything). The
process authenticates with a TokenRequest token of the chart's ServiceAccount, so it holds exactly
the RBAC the chart grants: whatever works here works in the pod.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

import yaml

from .procs import LocalProcess, free_ports, tail

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "llmserve"
RELEASE = "llmserve"
SYSTEM_NAMESPACE = "llmserve-system"
# The test bed's Prometheus servers run on this machine's loopback, each on a free port: the one
# origin (any port) LLMServices may name in spec.rollout.analysis.prometheus.url here (chart value
# prometheus.allowedUrls, operator flag --prometheus-allowed-url).
TESTBED_PROMETHEUS = "http://127.0.0.1"


class Cluster(Protocol):
    """What this module needs of a test bed (llmserve.testbed.cluster.TestBed provides it)."""

    kubeconfig: Path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120): ...

    def helm(self, *args: str, check: bool = True, timeout: float = 300): ...


class OperatorError(RuntimeError):
    """The local operator did not start or answer; the message carries the tail of its log."""


def install_chart(cluster: Cluster, namespace: str = SYSTEM_NAMESPACE, release: str = RELEASE,
                  values: dict | None = None) -> None:
    """`helm upgrade --install` the chart from this checkout. The operator Deployment is scaled
    to 0 by default: on the test bed its pod would be simulated, the local process does the work.
    LLMServices may name the test bed's Prometheus servers (on loopback) for their analysis."""
    if not (CHART_DIR / "Chart.yaml").exists():
        raise OperatorError(f"the chart is not at {CHART_DIR}: run from a checkout of the repository")
    values = {"replicaCount": 0, **(values or {})}
    values["prometheus"] = {"allowedUrls": [TESTBED_PROMETHEUS], **values.get("prometheus", {})}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values, file)
        file.flush()
        cluster.helm("upgrade", "--install", release, str(CHART_DIR), "--namespace", namespace,
                     "--create-namespace", "--values", file.name)


def service_account_kubeconfig(cluster: Cluster, dest: Path, namespace: str = SYSTEM_NAMESPACE,
                               service_account: str = RELEASE, duration: str = "24h") -> Path:
    """A kubeconfig for the cluster of `cluster.kubeconfig` that authenticates as the ServiceAccount."""
    token = cluster.kubectl("create", "token", service_account, "-n", namespace,
                            f"--duration={duration}").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster_entry = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster_entry],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": service_account, "context": {"cluster": cluster_entry["name"], "user": service_account,
                                                           "namespace": namespace}}],
        "current-context": service_account,
    }
    dest.write_text(yaml.safe_dump(config))
    dest.chmod(0o600)
    return dest


class LocalOperator:
    """`llmserve operator run` as a child process with a health/metrics port of its own."""

    def __init__(self, kubeconfig: Path, log_path: Path, *, identity: str = "local",
                 lease_namespace: str = SYSTEM_NAMESPACE, lease_name: str = RELEASE,
                 lease_duration: float = 6.0, extra_args: tuple[str, ...] = ()):
        self.port = free_ports(1)[0]
        self.identity = identity
        self.log_path = log_path
        argv = [sys.executable, "-m", "llmserve", "operator", "run", f"--kubeconfig={kubeconfig}",
                f"--identity={identity}", f"--lease-namespace={lease_namespace}", f"--lease-name={lease_name}",
                f"--lease-duration={lease_duration}", "--health-address=127.0.0.1",
                f"--health-port={self.port}", f"--prometheus-allowed-url={TESTBED_PROMETHEUS}", *extra_args]
        self._process = LocalProcess(argv, log_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> LocalOperator:
        self._process.start()
        return self

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            return resp.read().decode()

    def health(self) -> dict | None:
        """/healthz, or None while the process does not answer."""
        try:
            return json.loads(self._get("/healthz"))
        except (urllib.error.URLError, ConnectionError, OSError):
            return None

    def metrics(self) -> dict[str, float]:
        """The operator's counters by series name (labels included, e.g. `..._total{verb="GET"}`)."""
        out = {}
        for line in self._get("/metrics").splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_leading(self, timeout: float = 120) -> LocalOperator:
        """Block until this replica leads (its kopf watches then start within a moment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.returncode() is not None:
                raise OperatorError(f"the operator exited ({self._process.returncode()}):\n{tail(self.log_path)}")
            health = self.health()
            if health and health.get("leader"):
                return self
            time.sleep(0.2)
        raise OperatorError(f"the operator did not lead within {timeout:.0f}s:\n{tail(self.log_path)}")

    def returncode(self) -> int | None:
        return self._process.returncode()

    def kill(self) -> None:
        """SIGKILL: no graceful lease release, as when a node dies."""
        if self.pid and self.returncode() is None:
            os.kill(self.pid, signal.SIGKILL)
        self._process.stop()

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (graceful: the lease is released) and wait; returns the exit status."""
        if self.pid and self.returncode() is None:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.returncode() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        code = self.returncode()
        self._process.stop()
        return code

    def log(self) -> str:
        return tail(self.log_path, 200)
