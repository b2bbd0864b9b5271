"""The model repository on the test bed, provided the way a real cluster provides it: an
administrator's PersistentVolume and a PersistentVolumeClaim in the service's namespace, bound by
kube-controller-manager's volume binder, which an LLMService names as `pvc://<claim>/<path>`.

LLMServices cannot mount host directories (no `file://`); only the administrator's PersistentVolume
points at a directory of this machine (a `hostPath` volume, the test bed's stand-in for NFS or a
CSI volume). The pods are simulated, so nothing reads through it in the cluster; the quickstart
runs the pod's commands locally and finds the directory behind the claim with `claim_directory`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

MODEL_CLAIM = "models"
# PersistentVolumes of the test bed's model repositories carry this label (cleanup, inspection).
VOLUME_LABEL = "llmserve.io/testbed-model-repository"
CAPACITY = "10Gi"  # nominal: hostPath volumes enforce no size


class Cluster(Protocol):
    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120): ...

    def apply(self, *manifests: dict) -> None: ...


def volume_name(namespace: str, claim: str) -> str:
    """PersistentVolumes are cluster-wide: one per namespace and claim."""
    return f"{claim}-{namespace}"


def volume_manifest(directory: Path, namespace: str, claim: str) -> dict:
    """A read-only PersistentVolume of `directory`, reserved for `namespace/claim` (pre-bound)."""
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": volume_name(namespace, claim), "labels": {VOLUME_LABEL: "true"}},
        "spec": {
            "capacity": {"storage": CAPACITY},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": namespace, "name": claim},
            "hostPath": {"path": str(directory), "type": "Directory"},
        },
    }


def claim_manifest(namespace: str, claim: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "volumeName": volume_name(namespace, claim), "resources": {"requests": {"storage": CAPACITY}}},
    }


def model_repository(cluster: Cluster, namespace: str, directory: Path, claim: str = MODEL_CLAIM,
                     timeout: float = 60) -> str:
    """Make `directory` the claim `claim` in `namespace` and wait until the volume binder bound
    them; returns the repository URI `pvc://<claim>`. Idempotent for a claim that is bound already."""
    current = cluster.kubectl("get", "pvc", claim, "-n", namespace, "-o", "json", check=False)
    if current.returncode == 0 and json.loads(current.stdout).get("status", {}).get("phase") == "Bound":
        return f"pvc://{claim}"
    # A volume left Released by an earlier namespace of the same name cannot bind again.
    cluster.kubectl("delete", "pv", volume_name(namespace, claim), "--ignore-not-found", "--timeout=60s")
    cluster.apply(volume_manifest(Path(directory).resolve(), namespace, claim), claim_manifest(namespace, claim))
    cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", f"pvc/{claim}", "-n", namespace,
                    f"--timeout={int(timeout)}s", timeout=timeout + 30)
    return f"pvc://{claim}"


def release(cluster: Cluster, namespace: str, claim: str = MODEL_CLAIM) -> None:
    """Delete the volume of `namespace/claim` (it goes once the claim is gone: pv-protection)."""
    cluster.kubectl("delete", "pv", volume_name(namespace, claim), "--ignore-not-found", "--wait=false", check=False)


def claim_directory(cluster: Cluster, namespace: str, claim: str) -> Path:
    """The directory of this machine behind a bound claim: what the kubelet would mount."""
    pvc = json.loads(cluster.kubectl("get", "pvc", claim, "-n", namespace, "-o", "json").stdout)
    volume = json.loads(cluster.kubectl("get", "pv", pvc["spec"]["volumeName"], "-o", "json").stdout)
    return Path(volume["spec"]["hostPath"]["path"])
