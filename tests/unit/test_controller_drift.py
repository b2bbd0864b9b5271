"""Does the observed child already hold what we would apply?"""

from llmserve.operator.drift import differences

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
    assert differences(DESIRED, gone) == ["spec.template.spec.containers[tritonserver]"]


def test_atomic_lists_must_match_exactly():
    assert differences(DESIRED, observed(**{"spec/template/spec/containers/0/command": ["tritonserver"]})) == [
        "spec.template.spec.containers[tritonserver].command"]


def test_items_other_managers_added_to_named_lists_are_tolerated():
    extra = observed(**{"spec/template/spec/volumes": DESIRED["spec"]["template"]["spec"]["volumes"] +
                        [{"name": "injected", "emptyDir": {}}]})
    assert differences(DESIRED, extra) == []


def test_type_mismatch_is_drift():
    assert differences({"a": {"b": 1}}, {"a": "text"}) == ["a"]
    assert differences({"a": [1]}, {"a": {"x": 1}}) == ["a"]
