"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and a KWOK controller that runs simulated GPU nodes.

Everything a test bed owns lives in one directory (certificates, etcd data, logs, state.json), so
several test beds run side by side on free ports and ``down`` removes every trace. The pytest
fixtures and the ``llmserve testbed`` command use this same class.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import pki, toolchain
from .procs import free_ports, tail
from .paths import state_root

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"
GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
NODE_LABEL = "llmserve.io/testbed-node"

# Order matters: each component needs the ones before it.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class TestBedError(RuntimeError):
    """The test bed could not start or is not running; the message says which component and why."""

    __test__ = False


def node_manifest(name: str, gpus: int, taints: list[dict] | None = None) -> dict:
    """A Node that KWOK manages: GPU capacity and the labels GPU feature discovery would set."""
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus),
                "ephemeral-storage": "1Ti"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/agent": "",
                "type": "kwok",
                NODE_LABEL: "true",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(gpus),
            },
        },
        "spec": {"taints": taints or []},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


@dataclass
class TestBed:
    """One local cluster. ``TestBed("dev").up()`` starts it; ``down()`` removes it completely."""

    __test__ = False  # not a pytest test class
    name: str = "default"

    @property
    def dir(self) -> Path:
        return state_root() / self.name

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def bin_dir(self) -> Path:
        """kubectl and helm of the pinned versions, to put first on PATH."""
        return self.dir / "bin"

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise TestBedError(f"test bed {self.name!r} is not up (no {self.state_file}); "
                               f"start it with: llmserve testbed up --name {self.name}") from None

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state()['ports']['apiserver']}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    # ----------------------------------------------------------------- commands
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self._run(toolchain.KUBERNETES.path("kubectl"), args, input, check, timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self._run(toolchain.HELM.path("helm"), args, None, check, timeout)

    def _run(self, binary: Path, args, input, check, timeout) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(binary), *args], input=input, capture_output=True, text=True,
                                env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise TestBedError(f"{binary.name} {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    def apply(self, *manifests: dict) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))

    def add_nodes(self, count: int, gpus: int = 8, prefix: str = "gpu-node",
                  taints: list[dict] | None = None, start: int = 0) -> list[str]:
        """Create KWOK-managed GPU nodes ``<prefix>-<i>``; returns their names."""
        names = [f"{prefix}-{i}" for i in range(start, start + count)]
        self.apply(*(node_manifest(n, gpus, taints) for n in names))
        return names

    def wait_nodes_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
            not_ready = [n["metadata"]["name"] for n in nodes if not any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions", []))]
            if nodes and not not_ready:
                return
            if time.monotonic() > deadline:
                raise TestBedError(f"nodes not Ready after {timeout:.0f}s: {not_ready or 'no nodes'}\n"
                                   f"kwok log tail:\n{tail(self.dir / 'logs' / 'kwok.log')}")
            self._check_alive()
            time.sleep(0.5)

    # ----------------------------------------------------------------- lifecycle
    def up(self, nodes: int = 4, gpus: int = 8, taints: list[dict] | None = None,
           timeout: float = 120) -> "TestBed":
        """Start every component, create ``nodes`` GPU nodes and wait until all are Ready."""
        if self.state_file.exists():
            if self._alive():
                raise TestBedError(f"test bed {self.name!r} is already up "
                                   f"(KUBECONFIG={self.kubeconfig}); use another --name or run down first")
            self.down()
        binaries = toolchain.ensure_all()
        started = time.monotonic()
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "logs").mkdir(parents=True)
        self.bin_dir.mkdir()
        for tool in ("kubectl", "helm"):
            (self.bin_dir / tool).symlink_to(binaries[tool])
        pki.generate(self.dir / "pki", SERVICE_IP)
        ports = dict(zip(("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler",
                          "kwok"), free_ports(6)))
        state = {"name": self.name, "ports": ports, "pids": {}, "started": time.time()}
        self._write_kubeconfigs(ports["apiserver"])
        self.state_file.write_text(json.dumps(state))
        try:
            for component in COMPONENTS:
                state["pids"][component] = self._start(component, binaries, ports)
                self.state_file.write_text(json.dumps(state))
                self._wait_healthy(component, ports, timeout - (time.monotonic() - started))
            self.add_nodes(nodes, gpus, taints=taints)
            self.wait_nodes_ready(max(10.0, timeout - (time.monotonic() - started)))
            self._wait_default_service_account(max(10.0, timeout - (time.monotonic() - started)))
        except BaseException:
            self.down()
            raise
        state["ready_seconds"] = round(time.monotonic() - started, 1)
        self.state_file.write_text(json.dumps(state))
        return self

    def down(self) -> None:
        """Stop every process of this test bed and remove its directory. Safe to call twice."""
        try:
            pids = json.loads(self.state_file.read_text()).get("pids", {})
        except (FileNotFoundError, json.JSONDecodeError):
            pids = {}
        for component in reversed(COMPONENTS):
            pid = pids.get(component)
            if pid:
                _terminate(pid)
        shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict:
        """Per-component liveness, ports and node readiness, for ``llmserve testbed status``."""
        state = self.state()
        result = {"name": self.name, "kubeconfig": str(self.kubeconfig), "server": self.server,
                  "components": {c: ("running" if _pid_alive(p) else "dead")
                                 for c, p in state["pids"].items()},
                  "ready_seconds": state.get("ready_seconds")}
        if all(v == "running" for v in result["components"].values()):
            nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
            result["nodes"] = {
                n["metadata"]["name"]: {
                    "ready": any(c["type"] == "Ready" and c["status"] == "True"
                                 for c in n["status"].get("conditions", [])),
                    "gpus": n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0"),
                } for n in nodes}
        return result

    # ----------------------------------------------------------------- internals
    def _alive(self) -> bool:
        try:
            return any(_pid_alive(p) for p in self.state()["pids"].values())
        except (TestBedError, json.JSONDecodeError):
            return False

    def _check_alive(self) -> None:
        for component, pid in self.state()["pids"].items():
            if not _pid_alive(pid):
                raise TestBedError(f"{component} exited; last lines of its log:\n"
                                   f"{tail(self.dir / 'logs' / f'{component}.log')}")

    def _write_kubeconfigs(self, port: int) -> None:
        p = self.dir / "pki"
        for stem in pki.CLIENTS:
            config = {
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": self.name, "cluster": {
                    "server": f"https://127.0.0.1:{port}",
                    "certificate-authority-data": _b64(p / "ca.crt")}}],
                "users": [{"name": stem, "user": {
                    "client-certificate-data": _b64(p / f"{stem}.crt"),
                    "client-key-data": _b64(p / f"{stem}.key")}}],
                "contexts": [{"name": f"llmserve-{self.name}",
                              "context": {"cluster": self.name, "user": stem}}],
                "current-context": f"llmserve-{self.name}",
            }
            path = self.kubeconfig if stem == "admin" else self.dir / f"{stem}.kubeconfig"
            path.write_text(yaml.safe_dump(config))
            path.chmod(0o600)

    def _args(self, component: str, ports: dict) -> list[str]:
        d, p = self.dir, self.dir / "pki"
        if component == "etcd":
            client, peer = f"http://127.0.0.1:{ports['etcd']}", f"http://127.0.0.1:{ports['etcd_peer']}"
            return ["--name=testbed", f"--data-dir={d / 'etcd'}", f"--listen-client-urls={client}",
                    f"--advertise-client-urls={client}", f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=testbed={peer}",
                    "--unsafe-no-fsync", "--quota-backend-bytes=4294967296", "--log-level=warn"]
        if component == "kube-apiserver":
            return [
                f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--secure-port={ports['apiserver']}",
                f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--endpoint-reconciler-type=none",  # loopback is no valid Endpoints address
                "--allow-privileged=true",
                f"--requestheader-client-ca-file={p / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={p / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={p / 'front-proxy-client.key'}",
                # Aggregated APIs (the autoscaling tests' prometheus-adapter) run as local processes
                # behind a Service of type ExternalName `localhost`: Endpoints cannot hold loopback
                # addresses. Only cluster-IP routing resolves ExternalName services (endpoint
                # routing refuses them: 'unsupported service type "ExternalName"'), and no
                # cluster IP or pod IP is reachable on the test bed anyway.
                "--enable-aggregator-routing=false",
                # Every Service's ClusterIP is allocated under a lock of the API server. 1.33 by
                # default also writes the old bitmap allocator (one etcd key read and rewritten
                # per Service, under that lock) for clusters migrating from it: a fleet's Services
                # were created at ~8/s behind it (docs/operator.md#at-fleet-scale). A cluster born
                # on 1.33 has nothing to migrate; this gate (beta, KEP-1880's last step) turns the
                # dual write off and leaves the IPAddress allocator alone.
                "--feature-gates=DisableAllocatorDualWrite=true",
                "--profiling=false", "--v=1",
            ]
        if component == "kube-controller-manager":
            kc = d / "controller-manager.kubeconfig"
            return [
                f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1", f"--secure-port={ports['controller_manager']}",
                "--leader-elect=false", "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
                f"--cluster-signing-cert-file={p / 'ca.crt'}", f"--cluster-signing-key-file={p / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
                "--horizontal-pod-autoscaler-sync-period=5s",
                # About half the claims created next to their pre-bound volume (every test
                # namespace's `models`) were bound only at the volume binder's periodic sync (15 s
                # by default), not on their add event, also when the volume was Available first:
                # 14-15 s instead of 0.5 s. The same controller binds them, on a 1-s sync.
                "--pvclaimbinder-sync-period=1s",
                "--kube-api-qps=200", "--kube-api-burst=400",
                "--concurrent-deployment-syncs=20", "--concurrent-replicaset-syncs=20",
                "--concurrent-gc-syncs=40", "--v=1",
            ]
        if component == "kube-scheduler":
            kc = d / "scheduler.kubeconfig"
            return [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1",
                    f"--secure-port={ports['scheduler']}", "--leader-elect=false",
                    "--kube-api-qps=200", "--kube-api-burst=400", "--v=1"]
        if component == "kwok":
            return [f"--kubeconfig={d / 'kwok.kubeconfig'}", "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    f"--cidr={POD_CIDR}", "--node-ip=10.250.0.1",
                    f"--server-address=127.0.0.1:{ports['kwok']}", "--node-lease-duration-seconds=40"]
        raise ValueError(component)

    def _start(self, component: str, binaries: dict[str, Path], ports: dict) -> int:
        log = open(self.dir / "logs" / f"{component}.log", "ab")
        proc = subprocess.Popen([str(binaries[component]), *self._args(component, ports)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.dir, start_new_session=True)
        log.close()
        return proc.pid

    def _wait_healthy(self, component: str, ports: dict, timeout: float) -> None:
        urls = {
            "etcd": f"http://127.0.0.1:{ports['etcd']}/health",
            "kube-apiserver": f"https://127.0.0.1:{ports['apiserver']}/readyz",
            "kube-controller-manager": f"https://127.0.0.1:{ports['controller_manager']}/healthz",
            "kube-scheduler": f"https://127.0.0.1:{ports['scheduler']}/healthz",
            "kwok": f"http://127.0.0.1:{ports['kwok']}/healthz",
        }
        deadline = time.monotonic() + max(timeout, 10)
        last = ""
        while time.monotonic() < deadline:
            pid = self.state()["pids"][component]
            if not _pid_alive(pid):
                raise TestBedError(f"{component} exited during start-up; last lines of "
                                   f"{self.dir / 'logs' / (component + '.log')}:\n"
                                   f"{tail(self.dir / 'logs' / f'{component}.log')}")
            try:
                with urllib.request.urlopen(urls[component], context=self._tls(), timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TestBedError(f"{component} not healthy after {timeout:.0f}s ({urls[component]}: {last}); "
                           f"last lines of its log:\n{tail(self.dir / 'logs' / f'{component}.log')}")

    def _tls(self) -> ssl.SSLContext:
        """Admin client certificate; component serving certs are self-signed, so no verification
        for those health endpoints (loopback only)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        p = self.dir / "pki"
        ctx.load_cert_chain(p / "admin.crt", p / "admin.key")
        return ctx

    def _wait_default_service_account(self, timeout: float) -> None:
        """Pods cannot be created before the service-account controller made ``default``."""
        deadline = time.monotonic() + timeout
        while self.kubectl("get", "serviceaccount", "default", "-n", "default",
                           check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TestBedError("the service-account controller did not create default/default; "
                                   f"controller-manager log:\n"
                                   f"{tail(self.dir / 'logs' / 'kube-controller-manager.log')}")
            self._check_alive()
            time.sleep(0.3)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this very process counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _terminate(pid: int, grace: float = 10) -> None:
    """SIGTERM the component's process group, then SIGKILL what is left after ``grace``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def list_testbeds() -> list[str]:
    root = state_root()
    return sorted(p.name for p in root.iterdir() if (p / "state.json").exists()) if root.exists() else []
