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


def test_an_index_lagging_behind_several_of_our_writes_is_still_stale():
    """Two status writes in flight and a watch that has delivered neither: the index still shows
    the version before the first. Keeping only the last write's base would take that version for
    news and act on the object from before the rollout (it would restart at step 0)."""
    recent = Recent()
    recent.remember(obj("chat", "10", 0, kind="LLMService"), obj("chat", "12", 1, kind="LLMService"))
    recent.remember(obj("chat", "12", 1, kind="LLMService"), obj("chat", "14", 2, kind="LLMService"))
    for lagging in ("10", "12"):
        assert recent.fresh(obj("chat", lagging, 0, kind="LLMService"))["metadata"]["resourceVersion"] == "14"
    assert recent.fresh(obj("chat", "14", 2, kind="LLMService"))["spec"]["replicas"] == 2  # caught up
    assert len(recent) == 0


def test_created_objects_stand_in_until_the_index_has_them():
    recent = Recent()
    created = obj("chat-stable", "5", 1, kind="Service")
    created["metadata"]["labels"] = {"llmserve.io/service": "chat"}
    recent.remember(None, created)
    assert recent.unseen("a", "llmserve.io/service", "chat", "Service", set()) == [created]
    assert recent.unseen("a", "llmserve.io/service", "chat", "Service", {"chat-stable"}) == []
    assert recent.unseen("a", "llmserve.io/service", "chat", "Deployment", set()) == []


def test_a_relist_drops_entries_of_objects_deleted_meanwhile():
    recent = Recent()
    gone, live = obj("chat-v1", "1", 1), obj("chat-v2", "1", 1)
    gone["metadata"]["uid"], live["metadata"]["uid"] = "u-gone", "u-live"
    recent.remember(None, gone)
    recent.remember(None, live)
    recent.retain({"u-live"}, {"Deployment"}, listed_at=float("inf"))
    assert [o["metadata"]["name"] for o in recent.unseen("a", "x", "y", "Deployment", set())] == []
    assert len(recent) == 1
