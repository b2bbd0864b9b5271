"""Pure parts of the test bed: wrapper go.mod derivation, node manifests, free ports."""

from llmserve.testbed.cluster import node_manifest
from llmserve.testbed.toolchain import _local_replacements

K8S_GOMOD = """module k8s.io/kubernetes

require (
\tk8s.io/api v0.0.0
\tgithub.com/spf13/cobra v1.8.1
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
)
"""

ETCD_GOMOD = """module go.etcd.io/etcd/server/v3

require (
\tgo.etcd.io/etcd/api/v3 v3.5.21
\tgo.etcd.io/etcd/client/v2 v2.305.21 // indirect
)

replace (
\tgo.etcd.io/etcd/api/v3 => ../api
\tgo.etcd.io/etcd/client/v2 => ../client/v2
)

replace go.etcd.io/etcd => ./FORBIDDEN_DEPENDENCY
"""


def test_kubernetes_staging_placeholders_get_the_published_staging_version():
    assert _local_replacements(K8S_GOMOD, "v0.33.4") == {
        "k8s.io/api": "v0.33.4", "k8s.io/client-go": "v0.33.4"}


def test_etcd_siblings_keep_their_own_major_versions_and_forbidden_paths_are_skipped():
    assert _local_replacements(ETCD_GOMOD, "v3.5.21") == {
        "go.etcd.io/etcd/api/v3": "v3.5.21", "go.etcd.io/etcd/client/v2": "v2.305.21"}


def test_node_manifest_advertises_gpus_and_is_managed_by_kwok():
    node = node_manifest("n1", 8, taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}])
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"]
    assert node["spec"]["taints"][0]["key"] == "nvidia.com/gpu"


def test_the_model_repository_is_an_administrators_volume_reserved_for_one_claim():
    from pathlib import Path

    from llmserve.testbed.storage import claim_manifest, volume_manifest

    volume, claim = volume_manifest(Path("/srv/model_repo"), "team-a", "models"), claim_manifest("team-a", "models")
    assert volume["metadata"]["name"] == claim["spec"]["volumeName"] == "models-team-a"
    assert volume["spec"]["claimRef"] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                          "namespace": "team-a", "name": "models"}
    assert volume["spec"]["hostPath"] == {"path": "/srv/model_repo", "type": "Directory"}
    assert volume["spec"]["accessModes"] == claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    # No storage class on either side: no provisioner may take the claim instead.
    assert volume["spec"]["storageClassName"] == claim["spec"]["storageClassName"] == ""
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"  # never delete the models
