"""What the operator's watch indexes keep of each object, and what kopf computes per event."""

import inspect

import kopf

from llmserve.operator.handlers import registry, stored, watch_settings


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


def test_kopf_builds_no_diff_base_because_no_handler_detects_changes():
    """The diff base (deep copies of every watched object on every event) is only of use to
    change-detecting handlers; the operator has event handlers and indexes only."""
    settings = kopf.OperatorSettings()
    watch_settings(settings)
    body = kopf.Body({"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1}})
    assert settings.persistence.diffbase_storage.build(body=body) is None
    assert settings.persistence.diffbase_storage.fetch(body=body) is None
    assert registry._changing.get_all_handlers() == [] and registry._spawning.get_all_handlers() == []
    assert registry._watching.get_all_handlers() and registry._indexing.get_all_handlers()


def test_every_watch_handler_runs_on_the_event_loop():
    """kopf runs a plain function in its thread pool: a thread hop per watch event."""
    handlers = [*registry._indexing.get_all_handlers(), *registry._watching.get_all_handlers()]
    assert handlers and all(inspect.iscoroutinefunction(h.fn) for h in handlers)
