"""Does the observed child already hold what we would apply?"""

from llmserve.operator.drift import differences, foreign_items

DESIRED = {
    "metadata": {"name": "chat-v3", "labels": {"a": "1"}},
    "spec": {
        "replicas": 2,
        "template": {"spec": {
            "containers": [{"name": "tritonserver", "image": "triton:1", "command": ["tritonserver", "--x"],
                            "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "1000m"}}}],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1024Mi"}}],
        }},
    },
}


def observed(**changes):
    import copy
    obj = copy.deepcopy(DESIRED)
    obj["metadata"].update(uid="u", resourceVersion="7", labels={"a": "1", "added-by-someone": "x"})
    obj["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicy="IfNotPresent",
                                                            terminationMessagePath="/dev/termination-log")
    obj["status"] = {"replicas": 2}
    for path, value in changes.items():
        target = obj
        *parents, leaf = path.split("/")
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[leaf] = value
    return obj


def test_defaults_and_foreign_fields_are_not_drift():
    assert differences(DESIRED, observed()) == []


def test_quantities_compare_by_value():
    canonical = observed(**{"spec/template/spec/containers/0/resources": {"limits": {"nvidia.com/gpu": "1",
                                                                                   "cpu": "1"}},
                            "spec/template/spec/volumes/0/emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}})
    assert differences(DESIRED, canonical) == []


def test_edited_fields_are_reported_by_path():
    edited = observed(**{"spec/replicas": 5, "spec/template/spec/containers/0/image": "evil:latest"})
    assert differences(DESIRED, edited) == ["spec.replicas",
                                            "spec.template.spec.containers[tritonserver].image"]


def test_removed_fields_and_items_are_drift():
    assert differences(DESIRED, observed(**{"metadata/labels": {}})) == ["metadata.labels.a"]
    gone = observed(**{"spec/template/spec/containers": [{"name": "other"}]})
    assert differences(DESIRED, gone) == ["spec.template.spec.containers[tritonserver]",
                                          "spec.template.spec.containers[other]"]


def test_atomic_lists_must_match_exactly():
    assert differences(DESIRED, observed(**{"spec/template/spec/containers/0/command": ["tritonserver"]})) == [
        "spec.template.spec.containers[tritonserver].command"]


def test_items_we_no_longer_render_are_drift():
    """A volume, port or container the operator stopped rendering stays on the server until an
    apply without it removes it: comparing only the items we render would never notice."""
    extra = observed(**{"spec/template/spec/volumes": DESIRED["spec"]["template"]["spec"]["volumes"] +
                        [{"name": "old-cache", "emptyDir": {}}]})
    assert differences(DESIRED, extra) == ["spec.template.spec.volumes[old-cache]"]


def test_items_other_managers_own_are_tolerated():
    """An injected volume belongs to its manager: server-side apply leaves it, so do we."""
    extra = observed(**{"spec/template/spec/volumes": DESIRED["spec"]["template"]["spec"]["volumes"] +
                        [{"name": "injected", "emptyDir": {}}]})
    extra["metadata"]["managedFields"] = [
        {"manager": "llmserve-operator", "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
        {"manager": "sidecar-injector", "operation": "Update", "fieldsV1": {"f:spec": {"f:template": {"f:spec": {
            "f:volumes": {'k:{"name":"injected"}': {".": {}, "f:emptyDir": {}}}}}}}},
    ]
    assert differences(DESIRED, extra, foreign=foreign_items(extra, "llmserve-operator")) == []
    assert foreign_items(extra, "llmserve-operator") == {"spec.template.spec.volumes": [{"name": "injected"}]}


def test_a_backend_left_on_the_route_is_drift():
    """After an abort at a step >= 50 % the route must lose its canary backend, or about half the
    traffic goes to a Service with no ready pods."""
    want = {"spec": {"rules": [{"backendRefs": [{"name": "chat-stable", "port": 8080, "weight": 1}]}]}}
    seen = {"spec": {"rules": [{"backendRefs": [{"name": "chat-stable", "port": 8080, "weight": 1},
                                                {"name": "chat-canary", "port": 8080, "weight": 1}]}]}}
    assert differences(want, seen) == ["spec.rules[0].backendRefs[chat-canary]"]


def test_type_mismatch_is_drift():
    assert differences({"a": {"b": 1}}, {"a": "text"}) == ["a"]
    assert differences({"a": [1]}, {"a": {"x": 1}}) == ["a"]
