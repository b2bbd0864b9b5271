"""What the operator's watch indexes keep of each object."""

import kopf

from llmserve.operator.handlers import stored


def test_indexes_drop_our_managed_fields_and_kubectls_copy_of_the_object():
    body = kopf.Body({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "chat-v1", "resourceVersion": "7", "managedFields": [
            {"manager": "llmserve-operator", "operation": "Apply", "fieldsV1": {"f:spec": {}}},
            {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
             "fieldsV1": {"f:status": {}}},
        ], "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "a"},
            "ownerReferences": [{"uid": "u"}]},
        "spec": {"replicas": 2}, "status": {"readyReplicas": 2},
    })
    kept = stored(body)
    assert kept == {"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "chat-v1", "resourceVersion": "7", "annotations": {"team": "a"},
                                 "ownerReferences": [{"uid": "u"}]},
                    "spec": {"replicas": 2}, "status": {"readyReplicas": 2}}


def test_objects_without_annotations_keep_their_shape():
    assert stored(kopf.Body({"kind": "Service", "metadata": {"name": "chat"}})) == {
        "kind": "Service", "metadata": {"name": "chat"}}


def test_indexes_keep_what_drift_needs_of_other_managers():
    """Items other managers own are not ours to remove (drift.foreign_items); whether our own POST
    still owns what it created is kept without the field set."""
    other = {"manager": "injector", "operation": "Update", "fieldsV1": {"f:spec": {"f:volumes": {}}}}
    ours = {"manager": "llmserve-operator", "operation": "Update", "fieldsV1": {"f:spec": {}}}
    kept = stored(kopf.Body({"kind": "Deployment", "metadata": {"name": "d", "managedFields": [other, ours]}}))
    assert kept["metadata"]["managedFields"] == [other, {"manager": "llmserve-operator", "operation": "Update"}]
