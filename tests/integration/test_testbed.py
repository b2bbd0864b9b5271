"""Proof that every part of the test bed is real: the scheduler places GPU pods on KWOK nodes,
the garbage collector, TokenRequest + RBAC, Helm, and clean start/stop of whole test beds."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmserve.testbed import toolchain
from llmserve.testbed.cluster import TestBed, TestBedError
from llmserve.testbed.waiting import poll

pytestmark = pytest.mark.cluster


def get_json(bed, *args):
    return json.loads(bed.kubectl("get", *args, "-o", "json").stdout)


def gpu_deployment(name, namespace, gpus, replicas=1):
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "triton", "image": "nvcr.io/nvidia/tritonserver:25.01-py3",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }]},
            },
        },
    }


def test_versions_are_stamped(testbed):
    server = json.loads(testbed.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert server["gitVersion"] == toolchain.KUBERNETES_VERSION
    assert testbed.helm("version", "--short").stdout.startswith(toolchain.HELM_VERSION)


def test_nodes_advertise_gpus_and_are_ready(testbed):
    nodes = get_json(testbed, "nodes", "-l", "llmserve.io/testbed-node=true")["items"]
    assert len(nodes) >= 4
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_gpu_pods_are_scheduled_on_fake_gpu_nodes_and_become_ready(testbed, namespace):
    testbed.apply(gpu_deployment("gpu-ok", namespace, gpus=1, replicas=3))
    testbed.kubectl("rollout", "status", "deployment/gpu-ok", "-n", namespace, "--timeout=60s")
    pods = get_json(testbed, "pods", "-n", namespace, "-l", "app=gpu-ok")["items"]
    assert len(pods) == 3
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["nodeName"].startswith("gpu-node-")
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])


def test_pod_needing_more_gpus_than_any_node_stays_pending(testbed, namespace):
    testbed.apply(gpu_deployment("gpu-too-big", namespace, gpus=9))

    def failed_scheduling():
        events = get_json(testbed, "events", "-n", namespace,
                          "--field-selector", "reason=FailedScheduling")["items"]
        return [e for e in events if "nvidia.com/gpu" in e["message"]]

    events = poll("a FailedScheduling event", failed_scheduling, 60)
    assert "Insufficient nvidia.com/gpu" in events[0]["message"]
    pods = get_json(testbed, "pods", "-n", namespace, "-l", "app=gpu-too-big")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Pending"]


def test_garbage_collector_removes_dependents_of_a_deleted_owner(testbed, namespace):
    testbed.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = get_json(testbed, "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    testbed.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "dependent", "namespace": namespace,
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}})
    testbed.kubectl("delete", "configmap", "owner", "-n", namespace)
    poll("the garbage collector to delete the dependent",
         lambda: testbed.kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode, 60)


def test_token_request_token_authenticates_with_exactly_its_rbac(testbed, namespace):
    testbed.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    testbed.kubectl("create", "role", "read-configmaps", "--verb=get,list",
                    "--resource=configmaps", "-n", namespace)
    testbed.kubectl("create", "rolebinding", "reader", "--role=read-configmaps",
                    f"--serviceaccount={namespace}:reader", "-n", namespace)
    testbed.kubectl("create", "configmap", "visible", "-n", namespace)
    token = testbed.kubectl("create", "token", "reader", "-n", namespace, "--duration=10m").stdout.strip()
    claims = json.loads(_b64url(token.split(".")[1]))
    assert claims["sub"] == f"system:serviceaccount:{namespace}:reader"

    def as_reader(*args):
        return testbed.kubectl("--token", token, "--kubeconfig", "/dev/null", "--server", testbed.server,
                               "--certificate-authority", str(testbed.dir / "pki" / "ca.crt"),
                               *args, check=False)

    allowed = as_reader("get", "configmap", "visible", "-n", namespace, "-o", "name")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "configmap/visible"
    for forbidden in (("get", "secrets", "-n", namespace), ("get", "configmaps", "-n", "default"),
                      ("create", "configmap", "nope", "-n", namespace)):
        result = as_reader(*forbidden)
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), forbidden


def _b64url(part: str) -> bytes:
    import base64
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_helm_install_and_uninstall_a_chart(testbed, namespace, tmp_path):
    chart = tmp_path / "hello"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "v2", "name": "hello", "version": "0.1.0", "kubeVersion": ">=1.30.0-0"}))
    (chart / "values.yaml").write_text("greeting: hi\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeting\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n")
    # Offline rendering assumes the stamped Kubernetes version, so kubeVersion constraints hold.
    assert "hello-greeting" in testbed.helm("template", "hello", str(chart)).stdout
    testbed.helm("install", "demo", str(chart), "-n", namespace, "--set", "greeting=hello", "--wait")
    cm = get_json(testbed, "configmap", "demo-greeting", "-n", namespace)
    assert cm["data"]["greeting"] == "hello"
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    testbed.helm("uninstall", "demo", "-n", namespace, "--wait")
    assert testbed.kubectl("get", "configmap", "demo-greeting", "-n", namespace,
                           check=False).returncode != 0
    assert "demo" not in testbed.helm("list", "-n", namespace, "-q").stdout


def test_a_second_test_bed_runs_beside_and_down_leaves_nothing(testbed):
    second = TestBed(f"pytest-second-{os.getpid()}").up(nodes=1, gpus=2)
    try:
        state, first_state = second.state(), testbed.state()
        assert second.server != testbed.server
        assert set(state["ports"].values()).isdisjoint(first_state["ports"].values())
        assert second.kubectl("get", "nodes", "-o", "name").stdout.split() == ["node/gpu-node-0"]
        pids, ports, directory = state["pids"].values(), state["ports"].values(), second.dir
    finally:
        second.down()
    assert not directory.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"process {pid} survived down"
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, LISTEN is not
            s.bind(("127.0.0.1", port))
    assert testbed.kubectl("get", "nodes").returncode == 0  # the first one is untouched


def _is_zombie(pid):
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


def test_a_failing_component_reports_its_log_tail(monkeypatch):
    bed = TestBed(f"pytest-broken-{os.getpid()}")
    original = TestBed._args

    def broken_args(self, component, ports):
        args = original(self, component, ports)
        return args + ["--no-such-flag"] if component == "kube-apiserver" else args

    monkeypatch.setattr(TestBed, "_args", broken_args)
    with pytest.raises(TestBedError) as error:
        bed.up(nodes=1)
    message = str(error.value)
    assert "kube-apiserver" in message and "unknown flag: --no-such-flag" in message
    assert not bed.dir.exists()


def test_cli_reports_a_missing_test_bed_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "llmserve", "testbed", "kubeconfig", "--name", "never-started"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "is not up" in result.stderr and "Traceback" not in result.stderr


def test_tainted_gpu_nodes_take_only_pods_that_tolerate_the_taint(testbed, namespace):
    taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    [node] = testbed.add_nodes(1, gpus=4, prefix=f"tainted-{namespace}"[:40], taints=[taint])
    try:
        testbed.wait_nodes_ready()
        for name, tolerations in (("intolerant", []), ("tolerant", [{"key": "nvidia.com/gpu",
                                                                     "operator": "Exists"}])):
            deployment = gpu_deployment(name, namespace, gpus=1)
            deployment["spec"]["template"]["spec"].update(
                nodeSelector={"kubernetes.io/hostname": node}, tolerations=tolerations)
            testbed.apply(deployment)
        testbed.kubectl("rollout", "status", "deployment/tolerant", "-n", namespace, "--timeout=60s")
        events = poll("the intolerant pod to be refused", lambda: [
            e for e in get_json(testbed, "events", "-n", namespace,
                                "--field-selector", "reason=FailedScheduling")["items"]
            if "untolerated taint" in e["message"]], 60)
        assert "nvidia.com/gpu: present" in events[0]["message"]
    finally:
        testbed.kubectl("delete", "node", node, "--wait=false")
