"""The LeaderWorkerSet controller's installation on the test bed, from the module's own config/
(pure parts; the controller itself runs in tests/integration/test_distributed.py)."""

import pytest

from llmserve.testbed import lws, toolchain


@pytest.fixture(scope="module")
def config():
    if not toolchain.LWS.is_built():
        pytest.skip("the LeaderWorkerSet controller is not built (toolchain.build(toolchain.LWS))")
    return lws.module_dir() / "config"


def test_webhooks_are_the_releases_pointed_at_the_local_server(config):
    mutating, validating = lws.webhook_configurations(config, 9443, b"CA")
    assert (mutating["kind"], validating["kind"]) == ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
    hooks = {h["name"]: h for h in mutating["webhooks"] + validating["webhooks"]}
    assert set(hooks) == {"mleaderworkerset.kb.io", "mpod.kb.io", "vleaderworkerset.kb.io", "vpod.kb.io"}
    for hook in hooks.values():
        service = hook["clientConfig"]["service"]
        assert (service["name"], service["namespace"], service["port"]) == (lws.WEBHOOK_SERVICE, lws.NAMESPACE, 9443)
        assert hook["clientConfig"]["caBundle"] == "Q0E="
    # The release's patches: the pod webhooks see only LeaderWorkerSet pods.
    for name in ("mpod.kb.io", "vpod.kb.io"):
        assert hooks[name]["objectSelector"]["matchExpressions"][0]["key"] == "leaderworkerset.sigs.k8s.io/name"
    assert hooks["mpod.kb.io"]["clientConfig"]["service"]["path"] == "/mutate--v1-pod"


def test_replace_patches_and_only_those():
    doc = {"webhooks": [{"name": "a"}, {"name": "b"}]}
    assert lws.apply_replace_patches(doc, [{"op": "replace", "path": "/webhooks/1", "value": {"name": "c"}}]) == {
        "webhooks": [{"name": "a"}, {"name": "c"}]}
    assert doc["webhooks"][1] == {"name": "b"}
    with pytest.raises(lws.LWSError, match="unexpected patch operation"):
        lws.apply_replace_patches(doc, [{"op": "add", "path": "/x", "value": 1}])


def test_controller_config_serves_webhooks_on_loopback_without_its_own_certificates(tmp_path):
    cfg = lws.controller_config(9443, 8081, tmp_path)
    assert cfg["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": str(tmp_path)}
    assert cfg["internalCertManagement"] == {"enable": False}
    assert cfg["leaderElection"] == {"leaderElect": False}
    assert cfg["health"]["healthProbeBindAddress"] == "127.0.0.1:8081"
