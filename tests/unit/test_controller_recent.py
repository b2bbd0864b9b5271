"""The operator's memory of its own writes, used while the watch has not delivered them."""

from llmserve.operator.recent import Recent


def obj(name, rv, replicas, kind="Deployment", ns="a"):
    return {"kind": kind, "metadata": {"name": name, "namespace": ns, "resourceVersion": rv},
            "spec": {"replicas": replicas}}


def test_stale_index_is_replaced_by_what_we_wrote():
    recent = Recent()
    recent.remember(obj("chat-v1", "10", 4), obj("chat-v1", "12", 1))
    assert recent.fresh(obj("chat-v1", "10", 4))["spec"]["replicas"] == 1  # index still at 10
    assert recent.fresh(obj("chat-v1", "10", 4))["metadata"]["resourceVersion"] == "12"


def test_caught_up_or_newer_index_wins_and_the_entry_goes():
    recent = Recent()
    recent.remember(obj("chat-v1", "10", 4), obj("chat-v1", "12", 1))
    newer = obj("chat-v1", "15", 7)  # someone wrote after us: trust the watch
    assert recent.fresh(newer) is newer
    assert len(recent) == 0
    assert recent.fresh(obj("chat-v1", "10", 4))["spec"]["replicas"] == 4


def test_objects_are_told_apart_by_kind_namespace_and_name():
    recent = Recent()
    recent.remember(obj("chat", "10", 1, kind="Service"), obj("chat", "11", 2, kind="Service"))
    other = obj("chat", "10", 1, kind="PodDisruptionBudget")
    assert recent.fresh(other) is other
    assert recent.fresh(obj("chat", "10", 1, kind="Service", ns="b"))["spec"]["replicas"] == 1


def test_forgetting_a_deleted_service():
    recent = Recent()
    for name in ("chat", "chat-stable", "chat-v1-abc", "other"):
        recent.remember(obj(name, "1", 1), obj(name, "2", 2))
    recent.forget("a", "chat")
    assert len(recent) == 1
