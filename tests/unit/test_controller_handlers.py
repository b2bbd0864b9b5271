"""What the operator's watch indexes keep of each object."""

import kopf

from llmserve.operator.handlers import stored


def test_indexes_drop_managed_fields_and_kubectls_copy_of_the_object():
    body = kopf.Body({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "chat-v1", "resourceVersion": "7", "managedFields": [{"manager": "x"}],
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "a"},
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
