"""The operator end to end on the test bed: real apiserver, scheduler, garbage collector and KWOK
GPU nodes; the chart installed with helm; the operator a local process holding only the chart's
ServiceAccount permissions."""

import asyncio
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.operator import get_json, wait_for
from llmserve.operator import apply as applier
from llmserve.operator.kube import ApiError, KubeClient, load_config, now_rfc3339, object_path
from llmserve.operator.reconcile import Recorder, _write_status
from llmserve.operator.rollout import revision_name, serving_spec

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHILD_KINDS = "deployments,services,poddisruptionbudgets"


def llmservice(name, namespace, version=1, replicas=1, gpus=1, **spec):
    return {"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"name": "tiny-gpt", "repository": "pvc://models", "version": version},
                     "replicas": replicas, "runtime": {"gpus": gpus, "startupTimeout": "2m"}, **spec}}


def deployment(testbed, namespace, name):
    """The Deployment serving the LLMService's spec: `<name>-v<version>-<hash>` of its model, runtime
    and predictor as stored (with the CRD's defaults)."""
    return f"{name}-{revision_name(serving_spec(get_json(testbed, 'llms', name, '-n', namespace)['spec']))}"


def wait_ready(testbed, namespace, name, timeout=180):
    testbed.kubectl("wait", "--for=condition=Ready", f"llms/{name}", "-n", namespace, f"--timeout={timeout}s",
                    timeout=timeout + 30)
    return get_json(testbed, "llms", name, "-n", namespace)


def children(testbed, namespace, name):
    items = get_json(testbed, CHILD_KINDS, "-n", namespace, "-l", f"llmserve.io/service={name}")["items"]
    return {(i["kind"], i["metadata"]["name"]): i for i in items}


def condition(obj, type_):
    return next((c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == type_), None)


def test_example_becomes_ready_with_labeled_owned_children(testbed, operator, namespace):
    testbed.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "tiny-gpt.yaml"))
    obj = wait_ready(testbed, namespace, "tiny-gpt")

    status = obj["status"]
    example = deployment(testbed, namespace, "tiny-gpt")
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["stable"] == {"version": 1, "revision": example.removeprefix("tiny-gpt-"), "deployment": example,
                                "replicas": 1, "readyReplicas": 1, "weight": 100, "spec": serving_spec(obj["spec"])}
    assert status["replicas"] == 1
    assert status["endpoint"] == f"http://tiny-gpt.{namespace}.svc:8080"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Progressing": "False", "Degraded": "False"}

    kids = children(testbed, namespace, "tiny-gpt")
    # One replica, no rollout: no PDB and no track Services (they would protect nothing).
    assert set(kids) == {("Deployment", example), ("Service", "tiny-gpt")}
    for (kind, name), kid in kids.items():
        labels = kid["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "llmserve"
        track = "canary" if name == "tiny-gpt-canary" else "stable"
        assert labels["llmserve.io/track"] == track and labels["llmserve.io/model-version"] == "1"
        [ref] = kid["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("LLMService", obj["metadata"]["uid"], True)

    pods = get_json(testbed, "pods", "-n", namespace, "-l", "llmserve.io/service=tiny-gpt")["items"]
    assert len(pods) == 1 and pods[0]["spec"]["nodeName"]  # placed by the real scheduler on a GPU node
    assert pods[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    # Printer columns and the short name.
    table = testbed.kubectl("get", "llms", "-n", namespace).stdout.split()
    assert table[:6] == ["NAME", "READY", "STABLE", "CANARY", "WEIGHT", "REPLICAS"]
    assert table[7:10] == ["tiny-gpt", "True", "1"]

    events = get_json(testbed, "events", "-n", namespace, "--field-selector",
                      "involvedObject.kind=LLMService,involvedObject.name=tiny-gpt")["items"]
    reasons = {e["reason"] for e in events}
    assert "Ready" in reasons and "Created" not in reasons  # a repair, not a first creation, posts "Created"


def test_scale_subresource_drives_the_deployment(testbed, operator, namespace):
    testbed.apply(llmservice("scaled", namespace))
    wait_ready(testbed, namespace, "scaled")
    testbed.kubectl("scale", "llms/scaled", "-n", namespace, "--replicas=3")
    obj = wait_for(lambda: (o := get_json(testbed, "llms", "scaled", "-n", namespace))
                   and o["status"]["stable"]["readyReplicas"] == 3 and o, "3 ready replicas")
    assert obj["status"]["replicas"] == 3
    scale = json.loads(testbed.kubectl("get", "--raw", f"/apis/llmserve.io/v1alpha1/namespaces/{namespace}"
                                       "/llmservices/scaled/scale").stdout)
    assert scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == "llmserve.io/service=scaled,app.kubernetes.io/managed-by=llmserve"


def test_unplaceable_spec_reports_why_then_recovers(testbed, operator, namespace):
    testbed.apply(llmservice("greedy", namespace, gpus=16))  # the nodes have 8 GPUs each
    testbed.kubectl("wait", "--for=condition=Degraded", "llms/greedy", "-n", namespace, "--timeout=120s",
                    timeout=150)
    obj = get_json(testbed, "llms", "greedy", "-n", namespace)
    degraded, ready = condition(obj, "Degraded"), condition(obj, "Ready")
    assert degraded["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in degraded["message"]
    assert degraded["message"].startswith(f"1 of 1 pods of {deployment(testbed, namespace, 'greedy')}: 0/")
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")

    testbed.kubectl("patch", "llms/greedy", "-n", namespace, "--type=merge", "-p", '{"spec":{"runtime":{"gpus":2}}}')
    obj = wait_ready(testbed, namespace, "greedy")
    assert condition(obj, "Degraded")["status"] == "False"


def test_deleted_and_edited_children_are_repaired(testbed, operator, namespace):
    testbed.apply(llmservice("fixme", namespace, replicas=2))  # two replicas: it has a PDB
    wait_ready(testbed, namespace, "fixme")
    before = children(testbed, namespace, "fixme")

    testbed.kubectl("delete", "service", "fixme", "-n", namespace)
    testbed.kubectl("scale", "deployment", deployment(testbed, namespace, "fixme"), "-n", namespace, "--replicas=4")
    testbed.kubectl("patch", "deployment", deployment(testbed, namespace, "fixme"), "-n", namespace, "--type=json", "-p", json.dumps(
        [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "attacker/triton:evil"}]))
    testbed.kubectl("label", "poddisruptionbudget", "fixme", "-n", namespace, "app.kubernetes.io/managed-by-")

    def repaired():
        kids = children(testbed, namespace, "fixme")
        dep = kids.get(("Deployment", deployment(testbed, namespace, "fixme")))
        svc = kids.get(("Service", "fixme"))
        return (dep and svc and ("PodDisruptionBudget", "fixme") in kids
                and dep["spec"]["replicas"] == 2
                and dep["spec"]["template"]["spec"]["containers"][0]["image"].startswith("nvcr.io/")
                and svc["metadata"]["uid"] != before["Service", "fixme"]["metadata"]["uid"])

    wait_for(repaired, "the operator to restore the deleted Service, replicas, image and label")
    wait_ready(testbed, namespace, "fixme")
    events = get_json(testbed, "events", "-n", namespace, "--field-selector", "involvedObject.name=fixme")["items"]
    updates = " ".join(e["message"] for e in events if e["reason"] == "Updated")
    assert "spec.replicas" in updates and "containers[tritonserver].image" in updates
    assert "Service fixme" in " ".join(e["message"] for e in events if e["reason"] == "Created")


def test_objects_it_does_not_own_are_never_touched(testbed, operator, namespace):
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "taken", "namespace": namespace},
               "spec": {"selector": {"app": "someone-else"}, "ports": [{"port": 80}]}}
    testbed.apply(foreign)
    before = get_json(testbed, "service", "taken", "-n", namespace)
    testbed.apply(llmservice("taken", namespace))
    testbed.kubectl("wait", "--for=condition=Degraded", "llms/taken", "-n", namespace, "--timeout=120s",
                    timeout=150)
    degraded = condition(get_json(testbed, "llms", "taken", "-n", namespace), "Degraded")
    assert degraded["reason"] == "ChildConflict"
    assert "Service taken already exists and is not controlled by this LLMService" in degraded["message"]
    after = get_json(testbed, "service", "taken", "-n", namespace)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert "ownerReferences" not in after["metadata"]
    # The rest of the service is still created.
    wait_for(lambda: ("Deployment", deployment(testbed, namespace, "taken")) in children(testbed, namespace, "taken"), "the Deployment")


def test_version_change_rolls_out_a_new_deployment_and_removes_the_old_one(testbed, operator, namespace):
    testbed.apply(llmservice("moving", namespace, version=1))
    wait_ready(testbed, namespace, "moving")
    testbed.kubectl("patch", "llms/moving", "-n", namespace, "--type=merge", "-p",
                    '{"spec":{"model":{"version":2}}}')
    obj = wait_for(lambda: (o := get_json(testbed, "llms", "moving", "-n", namespace))
                   and o["status"].get("stable", {}).get("version") == 2
                   and condition(o, "Ready")["status"] == "True"
                   and condition(o, "Progressing")["status"] == "False" and o, "version 2 to be Ready")
    assert obj["status"]["stable"]["deployment"] == deployment(testbed, namespace, "moving")
    assert [h["version"] for h in obj["status"]["history"]] == [1, 2]
    wait_for(lambda: {k for k in children(testbed, namespace, "moving") if k[0] == "Deployment"}
             == {("Deployment", deployment(testbed, namespace, "moving"))}, "the version 1 Deployment to be deleted")


def test_deleting_the_llmservice_removes_its_children(testbed, operator, namespace):
    testbed.apply(llmservice("doomed", namespace))
    wait_ready(testbed, namespace, "doomed")
    assert len(children(testbed, namespace, "doomed")) == 2  # its Deployment and Service
    testbed.kubectl("delete", "llms/doomed", "-n", namespace)
    wait_for(lambda: not children(testbed, namespace, "doomed"), "the garbage collector to remove the children")
    wait_for(lambda: not get_json(testbed, "pods", "-n", namespace, "-l", "llmserve.io/service=doomed")["items"],
             "the pods to go")


def _resource_versions(testbed, namespace, name):
    objs = {("LLMService", name): get_json(testbed, "llms", name, "-n", namespace)}
    objs.update(children(testbed, namespace, name))
    return {key: o["metadata"]["resourceVersion"] for key, o in objs.items()}


def _events(testbed, namespace, name):
    items = get_json(testbed, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")["items"]
    return sorted((e["metadata"]["name"], e.get("count")) for e in items)


def test_steady_state_makes_no_writes(testbed, operator, namespace):
    testbed.apply(llmservice("calm", namespace, replicas=2))
    wait_ready(testbed, namespace, "calm")
    wait_for(lambda: condition(get_json(testbed, "llms", "calm", "-n", namespace), "Progressing")["status"]
             == "False", "the rollout to settle")
    versions = _resource_versions(testbed, namespace, "calm")
    events = _events(testbed, namespace, "calm")
    before = operator.metrics()

    # Events that make the operator reconcile without anything to change: pods and a child
    # touched by someone else (an annotation the operator does not render).
    for pod in get_json(testbed, "pods", "-n", namespace, "-l", "llmserve.io/service=calm")["items"]:
        testbed.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", namespace, "example.com/poke=1")
    testbed.kubectl("annotate", "service", "calm", "-n", namespace, "example.com/poke=1")
    wait_for(lambda: operator.metrics()["llmserve_operator_reconciles_total"]
             >= before["llmserve_operator_reconciles_total"] + 2, "the operator to reconcile the touched objects")

    # No status, child or Event write for this service (the operator's global write counter may
    # move meanwhile: earlier tests' namespaces are still being torn down).
    now = _resource_versions(testbed, namespace, "calm")
    changed = {k for k in versions if versions[k] != now[k]}
    assert changed == {("Service", "calm")}  # only our own annotate; the operator wrote nothing
    assert _events(testbed, namespace, "calm") == events


def test_killed_operator_restarts_and_converges_without_duplicates(testbed, operator, namespace):
    testbed.apply(llmservice("survivor", namespace, replicas=2))
    wait_ready(testbed, namespace, "survivor")
    before = children(testbed, namespace, "survivor")

    operator.process.kill()  # SIGKILL: the lease is not released, as when the node dies
    testbed.kubectl("delete", "poddisruptionbudget", "survivor", "-n", namespace)
    testbed.kubectl("scale", "deployment", deployment(testbed, namespace, "survivor"), "-n", namespace, "--replicas=1")
    testbed.apply(llmservice("newcomer", namespace))  # created while no operator runs

    operator.start()  # stands by until the abandoned lease expires, then resumes
    wait_ready(testbed, namespace, "newcomer")
    wait_for(lambda: (k := children(testbed, namespace, "survivor")) and ("PodDisruptionBudget", "survivor") in k
             and k["Deployment", deployment(testbed, namespace, "survivor")]["spec"]["replicas"] == 2, "survivor's children to be repaired")
    wait_ready(testbed, namespace, "survivor")

    after = children(testbed, namespace, "survivor")
    assert set(after) == set(before)  # no duplicates, nothing extra
    # An untouched child is not rewritten.
    service = ("Service", "survivor")
    assert after[service]["metadata"]["resourceVersion"] == before[service]["metadata"]["resourceVersion"]
    deployments = get_json(testbed, "deployments", "-n", namespace)["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == [deployment(testbed, namespace, "newcomer"), deployment(testbed, namespace, "survivor")]


def test_only_one_replica_acts_and_a_standby_takes_over(testbed, operator, namespace):
    standby = operator.spawn(identity="standby")
    wait_for(lambda: standby.health() is not None, "the standby to answer /healthz")
    assert standby.health()["leader"] is False
    lease = get_json(testbed, "lease", "llmserve", "-n", "llmserve-system")
    assert lease["spec"]["holderIdentity"] == operator.process.identity

    assert operator.process.stop() == 0  # graceful: releases the lease
    operator.process = standby.wait_leading()
    testbed.apply(llmservice("handover", namespace))
    wait_ready(testbed, namespace, "handover")
    lease = get_json(testbed, "lease", "llmserve", "-n", "llmserve-system")
    assert lease["spec"]["holderIdentity"] == "standby"


def test_a_leader_whose_lease_is_taken_stops_at_once_and_exits(testbed, operator, namespace):
    """Another holder in the lease: the old leader writes nothing more and exits non-zero (the
    kubelet restarts it as a standby), instead of acting beside the new one until its own view of
    the lease expires."""
    leader = operator.process
    testbed.kubectl("patch", "lease", "llmserve", "-n", "llmserve-system", "--type=merge", "-p", json.dumps(
        {"spec": {"holderIdentity": "thief", "leaseDurationSeconds": 3600, "renewTime": now_rfc3339(micro=True)}}))
    wait_for(lambda: leader.returncode() is not None, "the old leader to exit", timeout=30)
    assert leader.returncode() == 1
    assert "taken over by thief" in leader.log()

    testbed.kubectl("delete", "lease", "llmserve", "-n", "llmserve-system")  # the thief never ran
    operator.start()
    testbed.apply(llmservice("after-theft", namespace))
    wait_ready(testbed, namespace, "after-theft")


def test_a_status_computed_from_an_older_version_is_refused(testbed, operator, namespace):
    """Status writes are conditional on the resourceVersion they were computed from: a status
    computed from an object older than the stored one (a lagging watch) never overwrites it."""
    testbed.apply(llmservice("stale", namespace))
    before = wait_ready(testbed, namespace, "stale")
    testbed.kubectl("annotate", "llms/stale", "-n", namespace, "example.com/touched=1")  # a newer version
    stale_status = {**copy.deepcopy(before["status"]), "endpoint": "http://stale.invalid:1"}

    async def write():
        async with KubeClient(load_config(str(testbed.kubeconfig))) as client:
            await _write_status(client, Recorder(client), before, stale_status)

    with pytest.raises(ApiError) as refused:
        asyncio.run(write())
    assert refused.value.status == 409
    assert get_json(testbed, "llms", "stale", "-n", namespace)["status"]["endpoint"] != "http://stale.invalid:1"


def run_puller_as_the_kubelet_would(testbed, namespace, pod, built, workdir) -> str:
    """KWOK runs no init containers: run the pod's rendered model-puller command here (its volumes
    swapped for local directories), then put its termination message into the pod's status as
    the kubelet does. Returns the message."""
    [puller] = pod["spec"]["initContainers"]
    argv = list(puller["command"])
    assert argv[argv.index("--termination-message") + 1] == puller["terminationMessagePath"]
    assert puller["terminationMessagePolicy"] == "File"
    message = workdir / "termination-log"
    for flag, local in (("--source", built.repo), ("--dest", workdir / "models"), ("--termination-message", message)):
        argv[argv.index(flag) + 1] = str(local)
    done = subprocess.run([sys.executable, "-m", "llmserve", *argv[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    statuses = pod["status"].get("initContainerStatuses") or []
    terminated = {"exitCode": 0, "reason": "Completed", "message": message.read_text(),
                  "startedAt": now_rfc3339(), "finishedAt": now_rfc3339()}
    entry = {"name": puller["name"], "image": puller["image"], "imageID": "", "ready": True, "restartCount": 0,
             "started": False, "state": {"terminated": terminated}, "lastState": {}}
    index = next((i for i, cs in enumerate(statuses) if cs["name"] == puller["name"]), None)
    patch = ([{"op": "add", "path": "/status/initContainerStatuses", "value": [entry]}] if index is None else
             [{"op": "replace", "path": f"/status/initContainerStatuses/{index}/state",
               "value": {"terminated": terminated}}])
    testbed.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
                    "--type=json", "-p", json.dumps(patch))
    return message.read_text()


def test_the_served_models_lineage_reaches_the_status(testbed, operator, namespace, tiny_compressed_artifact,
                                                      tmp_path):
    built = tiny_compressed_artifact
    manifest = json.loads((built.path / "manifest.json").read_text())
    sha = hashlib.sha256((built.path / "manifest.json").read_bytes()).hexdigest()
    obj = llmservice("lineage", namespace, version=built.version, runtime={"engine": "onnxruntime", "gpus": 1})
    obj["spec"]["model"] |= {"name": built.name, "sha256": sha}
    testbed.apply(obj)
    assert "model" not in wait_ready(testbed, namespace, "lineage")["status"]["stable"]  # nothing reported yet

    [pod] = get_json(testbed, "pods", "-n", namespace, "-l", "llmserve.io/service=lineage")["items"]
    message = run_puller_as_the_kubelet_would(testbed, namespace, pod, built, tmp_path)
    assert json.loads(message)["model"] == built.name

    stable = wait_for(lambda: (o := get_json(testbed, "llms", "lineage", "-n", namespace))
                      and o["status"]["stable"].get("model") and o["status"]["stable"], "the model in the status")
    model = stable["model"]
    assert (model["version"], model["manifestSha256"], model["variant"]) == (built.version, sha, "w8")
    recorded = manifest["lineage"]
    assert model["lineage"]["methods"] == [{"name": "quantize-int8", "params": {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in recorded["methods"][0]["params"].items()}}]
    assert model["lineage"]["sourceSha256"] == recorded["source"]["sha256"] == model["lineage"]["teacherSha256"]
    gate = model["lineage"]["gate"]
    assert (gate["passed"], gate["family"]) == (True, recorded["gate"]["thresholds"]["family"])
    assert gate["metrics"]["positions"] == recorded["gate"]["metrics"]["positions"] >= 2000
    assert gate["metrics"]["mean_kl"] == pytest.approx(recorded["gate"]["metrics"]["mean_kl"], rel=1e-3)
    table = testbed.kubectl("get", "llms", "lineage", "-n", namespace, "-o", "wide").stdout.splitlines()
    at = table[0].index("METHODS")  # the columns are aligned; empty cells print as blanks
    assert table[1][at:].split()[0] == "quantize-int8"

    # Stable across reconciles: a poke makes the operator run again, and it writes nothing.
    wait_for(lambda: condition(get_json(testbed, "llms", "lineage", "-n", namespace), "Progressing")["status"]
             == "False", "the rollout to settle")
    version = get_json(testbed, "llms", "lineage", "-n", namespace)["metadata"]["resourceVersion"]
    before = operator.metrics()["llmserve_operator_reconciles_total"]
    testbed.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", namespace, "example.com/poke=1")
    wait_for(lambda: operator.metrics()["llmserve_operator_reconciles_total"] > before, "a reconcile")
    assert get_json(testbed, "llms", "lineage", "-n", namespace)["metadata"]["resourceVersion"] == version


def test_list_items_no_longer_rendered_are_removed_and_only_real_deletions_count(testbed, namespace):
    """A child created by POST (no GET first) and later applied without one of its volumes loses
    that volume: the apply adopts the fields the POST created, so server-side apply removes what
    we stop rendering. Deleting an object that is already gone reports False (no Deleted Event)."""
    owner = json.loads(testbed.kubectl("create", "configmap", "owner", "-n", namespace, "-o", "json").stdout)
    uid = owner["metadata"]["uid"]

    def deployment_with(*volumes):
        labels = {"app": "drift"}
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "drift", "namespace": namespace, "labels": labels,
                             "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                                  "uid": uid, "controller": True}]},
                "spec": {"replicas": 0, "selector": {"matchLabels": labels}, "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "example.com/c:1"}],
                             "volumes": [{"name": v, "emptyDir": {}} for v in volumes]}}}}

    async def ensure_as_the_engine_does(client, desired):
        """A 409 (the deployment controller wrote the object between our read and our write)
        makes the engine run again with a fresh read; so does this."""
        for _ in range(10):
            try:
                return await applier.ensure(client, desired, await client.get(object_path(desired)), uid)
            except ApiError as exc:
                if exc.status != 409:
                    raise
        raise AssertionError("still conflicting after 10 fresh reads")

    async def scenario():
        async with KubeClient(load_config(str(testbed.kubeconfig))) as client:
            created = await applier.ensure(client, deployment_with("a", "b"), None, uid)
            updated = await ensure_as_the_engine_does(client, deployment_with("a"))
            again = await ensure_as_the_engine_does(client, deployment_with("a"))
            return created, updated, again, await client.delete(again.obj), await client.delete(again.obj)

    created, updated, again, deleted, deleted_twice = asyncio.run(scenario())
    assert created.action == applier.CREATED
    assert updated.action == applier.UPDATED and updated.changed == ["spec.template.spec.volumes[b]"]
    assert [v["name"] for v in updated.obj["spec"]["template"]["spec"]["volumes"]] == ["a"]
    assert again.action == applier.UNCHANGED
    assert (deleted, deleted_twice) == (True, False)


def test_crd_defaults_do_not_change_the_revision(testbed, llmserve_chart):
    """The API server adds the CRD's defaults to what it stores: the revision (hence the Deployment
    and every GPU pod) must be the same with or without them spelled out (rollout.SERVING_DEFAULTS)."""
    manifest = llmservice("defaulted", "default")
    manifest["spec"]["runtime"] = {}
    stored = json.loads(testbed.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                                        input=yaml.safe_dump(manifest)).stdout)
    assert stored["spec"]["runtime"], "the CRD defaults nothing in spec.runtime any more: drop this test"
    assert revision_name(serving_spec(stored["spec"])) == revision_name(serving_spec(manifest["spec"]))


@pytest.mark.parametrize("verb,resource,allowed", [
    ("watch", "llmservices.llmserve.io", True),
    ("patch", "llmservices.llmserve.io/status", True),
    ("get", "llmservices.llmserve.io", False),
    ("patch", "llmservices.llmserve.io", False),
    ("update", "llmservices.llmserve.io/finalizers", False),
    ("update", "llmservices.llmserve.io/scale", False),
    ("patch", "deployments.apps", True),
    ("delete", "deployments.apps", True),
    ("list", "pods", True),
    ("create", "events", True),
    ("delete", "services", False),
    ("delete", "llmservices.llmserve.io", False),
    ("create", "pods", False),
    ("get", "secrets", False),
    ("update", "deployments.apps", False),
    ("get", "configmaps", False),
])
def test_service_account_has_exactly_what_the_operator_does(testbed, llmserve_chart, verb, resource, allowed):
    # `kind/name` means an object name to kubectl auth can-i: a subresource goes in its own flag.
    resource, _, subresource = resource.partition("/")
    result = testbed.kubectl("auth", "can-i", verb, resource, "--all-namespaces", f"--subresource={subresource}",
                             "--as=system:serviceaccount:llmserve-system:llmserve", check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no")


def _mutate(base, path, value):
    obj = copy.deepcopy(base)
    *parents, leaf = path
    target = obj
    for key in parents:
        target = target.setdefault(key, {}) if isinstance(key, str) else target[key]
    if value is DELETE:
        del target[leaf]
    else:
        target[leaf] = value
    return obj


DELETE = object()
INVALID = [
    # (id, path, value, substrings the API server's message must contain: the field and the rule)
    ("version-zero", ("spec", "model", "version"), 0, ["spec.model.version", "greater than or equal to 1"]),
    ("version-not-integer", ("spec", "model", "version"), "three", ["spec.model.version", "integer"]),
    ("sha256-format", ("spec", "model", "sha256"), "abc123", ["spec.model.sha256", "64 lowercase hexadecimal"]),
    ("repository-s3", ("spec", "model", "repository"), "s3://bucket/repo",
     ["spec.model.repository", "s3:// is not supported yet"]),
    ("repository-http", ("spec", "model", "repository"), "http://example.com/repo",
     ["spec.model.repository", "must be pvc://<claim>/<path>"]),
    ("model-name-missing", ("spec", "model", "name"), DELETE, ["spec.model.name", "Required value"]),
    ("replicas-negative", ("spec", "replicas"), -1, ["spec.replicas", "greater than or equal to 0"]),
    ("gpus-negative", ("spec", "runtime", "gpus"), -1, ["spec.runtime.gpus", "greater than or equal to 0"]),
    ("gpu-in-resources", ("spec", "runtime", "resources"), {"limits": {"nvidia.com/gpu": 1}},
     ["spec.runtime.resources", "set GPUs with spec.runtime.gpus"]),
    ("resource-not-quantity", ("spec", "runtime", "resources"), {"requests": {"cpu": "lots"}},
     ["spec.runtime.resources.requests.cpu", "should match"]),
    ("startup-timeout-too-long", ("spec", "runtime", "startupTimeout"), "48h",
     ["spec.runtime.startupTimeout", "between 10s and 6h"]),
    ("startup-timeout-not-duration", ("spec", "runtime", "startupTimeout"), "ten minutes",
     ["spec.runtime.startupTimeout", "duration"]),
    ("toleration-operator", ("spec", "runtime", "tolerations"), [{"key": "gpu", "operator": "Maybe"}],
     ["spec.runtime.tolerations[0].operator", "Unsupported value"]),
    ("autoscaling-min-above-max", ("spec", "autoscaling"), {"minReplicas": 5, "maxReplicas": 2},
     ["spec.autoscaling.minReplicas", "less than or equal to maxReplicas"]),
    ("autoscaling-metric", ("spec", "autoscaling"), {"maxReplicas": 2, "metric": "cpu"},
     ["spec.autoscaling.metric", "Unsupported value"]),
    ("weights-decreasing", ("spec", "rollout"), {"steps": [{"weight": 50}, {"weight": 10}]},
     ["spec.rollout.steps", "strictly increase"]),
    ("weights-repeated", ("spec", "rollout"), {"steps": [{"weight": 10}, {"weight": 10}]},
     ["spec.rollout.steps", "strictly increase"]),
    ("weight-above-100", ("spec", "rollout"), {"steps": [{"weight": 150}]},
     ["spec.rollout.steps[0].weight", "less than or equal to 100"]),
    ("pause-not-duration", ("spec", "rollout"), {"steps": [{"weight": 10, "pause": "5 minutes"}]},
     ["spec.rollout.steps[0].pause", "duration"]),
    ("error-rate-above-one", ("spec", "rollout"), {"analysis": {"maxErrorRate": "2"}},
     ["spec.rollout.analysis.maxErrorRate", "fraction between 0 and 1"]),
    ("surge-zero", ("spec", "rollout"), {"maxSurge": 0}, ["spec.rollout.maxSurge", "greater than or equal to 1"]),
    ("interval-too-short", ("spec", "rollout"), {"analysis": {"interval": "1s"}},
     ["spec.rollout.analysis.interval", "between 2s and 1h"]),
    ("prometheus-not-url", ("spec", "rollout"), {"analysis": {"prometheus": {"url": "prometheus:9090"}}},
     ["spec.rollout.analysis.prometheus.url", "the operator fetches no other URL"]),
    # Engines (issue 10): settings that cannot work are refused with what to change.
    ("engine-unknown", ("spec", "runtime"), {"engine": "tensorrt"}, ["spec.runtime.engine", "Unsupported value"]),
    ("tensor-parallel-beyond-gpus", ("spec", "runtime"), {"gpus": 2, "parallelism": {"tensor": 4}},
     ["spec.runtime.parallelism", "parallelism does not match the GPUs"]),
    ("vllm-setting-on-onnxruntime", ("spec", "runtime"), {"engine": "onnxruntime",
                                                          "engineSettings": {"prefixCaching": True}},
     ["spec.runtime.engineSettings", "engine onnxruntime takes only", "are vLLM settings"]),
    ("gpu-memory-above-one", ("spec", "runtime"), {"engineSettings": {"gpuMemoryUtilization": 1.5}},
     ["spec.runtime.engineSettings.gpuMemoryUtilization", "less than or equal to 1"]),
    ("gpu-memory-zero", ("spec", "runtime"), {"engineSettings": {"gpuMemoryUtilization": 0}},
     ["spec.runtime.engineSettings.gpuMemoryUtilization", "greater than 0"]),
    ("max-model-length-tiny", ("spec", "runtime"), {"engineSettings": {"maxModelLength": 8}},
     ["spec.runtime.engineSettings.maxModelLength", "greater than or equal to 16"]),
    ("max-sequences-zero", ("spec", "runtime"), {"engineSettings": {"maxConcurrentSequences": 0}},
     ["spec.runtime.engineSettings.maxConcurrentSequences", "greater than or equal to 1"]),
    ("dtype-unknown", ("spec", "runtime"), {"engineSettings": {"dtype": "int4"}},
     ["spec.runtime.engineSettings.dtype", "Unsupported value"]),
    ("quantization-unknown", ("spec", "runtime"), {"engineSettings": {"quantization": "magic"}},
     ["spec.runtime.engineSettings.quantization", "Unsupported value"]),
    ("image-without-vllm", ("spec", "runtime"), {"image": "nvcr.io/nvidia/tritonserver:25.08-py3"},
     ["spec.runtime.image", "cannot load engine vllm", "leave image unset"]),
    ("vllm-image-for-onnxruntime", ("spec", "runtime"),
     {"engine": "onnxruntime", "image": "nvcr.io/nvidia/tritonserver:25.08-vllm-python-py3"},
     ["spec.runtime.image", "cannot load engine onnxruntime"]),
    ("unknown-field", ("spec", "modle"), {"name": "typo"}, ['unknown field "spec.modle"']),
    ("name-not-dns-label", ("metadata", "name"), "chat.bot", ["metadata.name must be a DNS-1035 label"]),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifests_are_refused_naming_field_and_rule(testbed, llmserve_chart, case):
    _, path, value, expected = case
    manifest = _mutate(llmservice("valid", "default"), path, value)
    result = testbed.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0, f"accepted: {manifest}"
    for text in expected:
        assert text in result.stderr, result.stderr


def test_the_base_of_the_invalid_cases_is_valid(testbed, llmserve_chart):
    """So that each invalid case above fails for its own reason only."""
    testbed.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(llmservice("valid", "default")))


@pytest.mark.parametrize("runtime", [
    {"gpus": 4, "engine": "vllm", "image": "nvcr.io/nvidia/tritonserver:25.08-vllm-python-py3",
     "engineSettings": {"maxModelLength": 8192, "gpuMemoryUtilization": 0.85, "maxConcurrentSequences": 128,
                        "prefixCaching": True, "dtype": "bfloat16", "quantization": "fp8"}},
    {"gpus": 0, "engineSettings": {"gpuMemoryUtilization": 0.1}},
    {"gpus": 1, "engine": "onnxruntime", "engineSettings": {"maxModelLength": 2048, "maxConcurrentSequences": 8}},
    {"engine": "onnxruntime", "image": "registry.example/custom-triton:1"},
], ids=["vllm-4-gpus", "vllm-cpu", "onnxruntime", "custom-image"])
def test_engine_settings_that_fit_are_stored_as_written(testbed, llmserve_chart, runtime):
    manifest = _mutate(llmservice("valid", "default"), ("spec", "runtime"), runtime)
    stored = json.loads(testbed.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                                        input=yaml.safe_dump(manifest)).stdout)
    assert {k: stored["spec"]["runtime"][k] for k in runtime} == runtime
