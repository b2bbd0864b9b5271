"""Lineage from the manifest to the LLMService status: the model puller's termination message
(llmserve.artifacts.report, `llmserve pull --termination-message`) and the operator reading it
back from the pod's status (llmserve.operator.puller_report, status.compute)."""

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from llmserve.artifacts.manifest import Manifest, write_manifest
from llmserve.artifacts.report import TERMINATION_MESSAGE_LIMIT, pull_report
from llmserve.artifacts.repository import ServingConfig, publish, render_config, staging_dir
from llmserve.compress import lineage
from llmserve.operator import rollout
from llmserve.operator.puller_report import message_of, parse, served_model
from llmserve.operator.spec import Spec, deployment_name
from llmserve.operator.status import Observation, compute, pod_summary

SOURCE, TEACHER, MANIFEST_SHA = "a" * 64, "b" * 64, "c" * 64
T0 = "2026-01-01T00:00:00Z"


def recorded_lineage(methods=None):
    """A lineage as `llmserve compress` records it (lineage.extend() plus the gate's record)."""
    out = lineage.extend({"format": 1, "teacher": {"path": "/t", "sha256": TEACHER}, "source": {},
                          "methods": [{"name": "narrow-mlp", "params": {"keep": 0.75}}]},
                         {"path": "/s", "sha256": SOURCE},
                         methods or [{"name": "quantize-int8", "params": {"block_size": 32, "symmetric": True,
                                                                          "keep": "lm_head"}}])
    return out | {"gate": {"metrics": {"mean_kl": 0.000123456, "ppl_increase": -0.00027134, "positions": 2048,
                                       "confident_agreement": 1.0, "teacher_ppl": 5.98},
                           "thresholds": {"family": "quantization-8bit", "max_mean_kl": 0.01, "reason": "..."},
                           "passed": True, "failures": [], "corpus": "/c"},
                  "tools": {"torch": "2"}, "created": "2026-01-01T00:00:00+00:00"}


def manifest(lineage_record=None, model="tiny-int8"):
    return Manifest({"model": model, "variant": "w8", "lineage": lineage_record, "files": {}}, MANIFEST_SHA)


# -- what the puller writes ----------------------------------------------------------------------

def test_report_names_the_version_and_a_compact_lineage():
    report = json.loads(pull_report(manifest(recorded_lineage()), 3))
    assert report == {
        "model": "tiny-int8", "version": 3, "manifestSha256": MANIFEST_SHA, "variant": "w8",
        "lineage": {"methods": [{"name": "narrow-mlp", "params": {"keep": "0.75"}},
                                {"name": "quantize-int8", "params": {"block_size": "32", "keep": "lm_head",
                                                                     "symmetric": "true"}}],
                    "sourceSha256": SOURCE, "teacherSha256": TEACHER,
                    "gate": {"passed": True, "family": "quantization-8bit",
                             "metrics": {"mean_kl": 0.0001235, "ppl_increase": -0.0002713, "positions": 2048,
                                         "confident_agreement": 1.0}}}}


def test_a_model_built_as_is_reports_no_lineage():
    assert json.loads(pull_report(manifest(None), 1)) == {
        "model": "tiny-int8", "version": 1, "manifestSha256": MANIFEST_SHA, "variant": "w8"}


def test_a_lineage_too_long_for_the_message_shrinks_step_by_step_and_stays_json():
    record = recorded_lineage([{"name": "quantize-int8", "params": {f"p{i}": "x" * 20 for i in range(6)}},
                               {"name": "distill", "params": {"steps": 200}}])
    full = pull_report(manifest(record), 1)
    names = ["narrow-mlp", "quantize-int8", "distill"]
    shapes = []
    for limit in range(len(full), len(pull_report(manifest(None), 1)) - 1, -5):
        text = pull_report(manifest(record), 1, limit=limit)
        assert len(text) <= limit
        report = json.loads(text)
        assert report["manifestSha256"] == MANIFEST_SHA and report["version"] == 1
        kept = report.get("lineage")
        if kept is None:
            shapes.append("no lineage")
            continue
        methods = [m["name"] for m in kept["methods"]]
        assert methods == names[len(names) - len(methods):]  # the newest methods are kept
        shapes.append("full" if text == full else "no metrics" if "params" in (kept["methods"] or [{}])[0]
                      else f"{len(methods)} names")
        assert kept.get("truncated") is (None if text == full else True)
    assert list(dict.fromkeys(shapes)) == ["full", "no metrics", "3 names", "2 names", "1 names", "0 names",
                                           "no lineage"]


def test_the_default_limit_is_what_kubernetes_keeps():
    many = [{"name": "distill", "params": {f"k{i}": "v" * 100 for i in range(10)}} for _ in range(12)]
    text = pull_report(manifest(recorded_lineage(many)), 1)
    assert TERMINATION_MESSAGE_LIMIT == 4096 and len(text.encode()) <= 4096
    assert parse(text)["lineage"]["truncated"] is True


def _published_with_lineage(tmp_path):
    repo = tmp_path / "repo"
    staged = staging_dir(repo, "m")
    (staged / "config.pbtxt").write_text(render_config("m", "embedding", ServingConfig()))
    sha = write_manifest(staged, {"model": "m", "variant": "fp32", "lineage": recorded_lineage()})
    return repo, publish(staged, repo, "m"), sha


def _pull(*args):
    return subprocess.run([str(Path(sys.executable).parent / "llmserve"), "pull", *map(str, args)],
                          capture_output=True, text=True)


def test_pull_writes_its_report_only_where_asked(tmp_path):
    repo, version, sha = _published_with_lineage(tmp_path)
    message = tmp_path / "termination-log"
    done = _pull("--source", repo, "--model", "m", "--version", version, "--dest", tmp_path / "d1",
                 "--termination-message", message)
    assert done.returncode == 0, done.stderr
    assert parse(message.read_text()) == {"version": 1, "manifestSha256": sha, "variant": "fp32",
                                          "lineage": json.loads(message.read_text())["lineage"]}
    # Outside a pod: no flag, nothing written; a path that cannot be written only warns.
    unwritable = _pull("--source", repo, "--model", "m", "--version", version, "--dest", tmp_path / "d2",
                       "--termination-message", tmp_path / "missing" / "log")
    assert unwritable.returncode == 0 and "warning: cannot write the termination message" in unwritable.stderr
    # A refused pull says why there (the status's ModelPullFailed message), never a report.
    refused = _pull("--source", repo, "--model", "m", "--version", version, "--dest", tmp_path / "d3",
                    "--sha256", "0" * 64, "--termination-message", message)
    assert refused.returncode == 1
    assert "expected " + "0" * 64 in message.read_text() and parse(message.read_text()) is None


# -- what the operator reads ---------------------------------------------------------------------

REPORT = pull_report(manifest(recorded_lineage()), 3)


@pytest.mark.parametrize("message", [
    None, "", "sha256 mismatch: 1/model.onnx", "[]", "null", '{"version": 3}', "{" * 5000, "[" * 3000 + "]" * 3000,
    json.dumps({"version": True, "manifestSha256": MANIFEST_SHA}),
    json.dumps({"version": 3, "manifestSha256": "C" * 64}),
    json.dumps({"version": 3, "manifestSha256": MANIFEST_SHA, "pad": "x" * 5000}),
    REPORT[:-10],  # cut short
])
def test_garbage_is_ignored(message):
    assert parse(message) is None


def test_only_known_fields_of_the_right_shape_survive():
    raw = json.loads(REPORT)
    raw["extra"] = {"evil": "x"}
    raw["variant"] = "w8; rm -rf /"
    raw["lineage"]["methods"] += [{"name": "ok", "params": {"n": 3, "a b": "x", "s": "y" * 500, "t": "fine"}},
                                  "not a method", {"name": ""}]
    raw["lineage"]["gate"]["metrics"] |= {"nan": float("nan"), "flag": True, "text": "1"}
    raw["lineage"]["sourceSha256"] = "short"
    raw["lineage"]["truncated"] = "yes"
    parsed = parse(json.dumps(raw))
    assert set(parsed) == {"version", "manifestSha256", "lineage"}
    assert parsed["lineage"]["methods"][-1] == {"name": "ok", "params": {"t": "fine"}}
    assert len(parsed["lineage"]["methods"]) == 3
    assert set(parsed["lineage"]["gate"]["metrics"]) == {"mean_kl", "ppl_increase", "positions", "confident_agreement"}
    assert "sourceSha256" not in parsed["lineage"] and "truncated" not in parsed["lineage"]


def test_sizes_are_capped():
    raw = json.loads(REPORT)
    raw["lineage"]["methods"] = [{"name": "wide", "params": {f"k{j}": "v" for j in range(40)}}]
    raw["lineage"]["methods"] += [{"name": f"m{i}"} for i in range(30)]
    parsed = parse(json.dumps(raw, separators=(",", ":")))
    assert len(parsed["lineage"]["methods"]) == 16
    assert len(parsed["lineage"]["methods"][0]["params"]) == 16


def puller_status(message, exit_code=0, last=False):
    terminated = {"terminated": {"exitCode": exit_code, "reason": "Completed", "message": message}}
    status = {"name": "model-puller", "state": {"running": {}} if last else terminated}
    if last:
        status["lastState"] = terminated
    return {"initContainerStatuses": [{"name": "other", "state": terminated}, status]}


def test_the_message_is_read_from_the_pullers_successful_run_only():
    assert message_of({"status": puller_status(REPORT)}) == REPORT
    assert message_of({"status": puller_status(REPORT, last=True)}) == REPORT
    assert message_of({"status": puller_status("refused", exit_code=1)}) is None
    assert message_of({"status": {"initContainerStatuses": [{"name": "other", "state": {
        "terminated": {"exitCode": 0, "message": REPORT}}}]}}) is None
    assert message_of({"status": {"initContainerStatuses": ["junk", {"name": "model-puller", "state": "junk"}]}}) is None
    assert message_of({}) is None


# -- the status ----------------------------------------------------------------------------------

def spec(version=3):
    return Spec.from_object({"metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 1},
                             "spec": {"replicas": 2, "model": {"name": "tiny", "repository": "pvc://m/r",
                                                               "version": version}}})


def pod(suffix, ready=True, version=3, message=REPORT, deleting=False):
    meta = {"name": f"{deployment_name('chat', spec(version).revision)}-{suffix}", "uid": suffix,
            "labels": {"llmserve.io/model-version": str(version), "llmserve.io/revision": spec(version).revision}}
    if deleting:
        meta["deletionTimestamp"] = T0
    return pod_summary({"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": str(ready)}],
                                                    **puller_status(message)}})


def status_with(pods, previous=None, s=None):
    s = s or spec()
    dep = {"metadata": {"name": deployment_name("chat", s.revision), "generation": 1},
           "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2,
                      "availableReplicas": 2}}
    plan = rollout.plan(s.rollout, s.serving, s.replicas, previous, rollout.Observed(2, 0),
                        datetime(2026, 1, 1, tzinfo=timezone.utc))
    return compute(s, Observation(deployments=[dep], pods=pods), previous, T0, plan)


def test_a_ready_pods_report_becomes_the_stable_tracks_model():
    status = status_with([pod("b"), pod("a")])
    assert status["stable"]["model"] == parse(REPORT)
    assert status["stable"]["model"]["lineage"]["methods"][-1]["name"] == "quantize-int8"
    # The same status whatever order the pods were seen in, and for a second run (no write).
    assert status_with([pod("a"), pod("b")]) == status == status_with([pod("b"), pod("a")], previous=status)


def test_no_model_until_a_ready_pod_of_the_revision_reports_one():
    assert "model" not in status_with([])["stable"]
    assert "model" not in status_with([pod("a", ready=False), pod("b", deleting=True)])["stable"]
    assert "model" not in status_with([pod("a", message="garbage")])["stable"]
    other_version = pull_report(manifest(recorded_lineage()), 4)
    assert "model" not in status_with([pod("a", message=other_version)])["stable"]


def test_a_restarting_pod_keeps_what_the_status_said():
    before = status_with([pod("a")])
    after = status_with([pod("a", ready=False)], previous=before)
    assert after["stable"]["model"] == before["stable"]["model"]


def test_the_canary_block_gets_its_own_pods_report():
    stable = status_with([pod("a")])
    canary_report = pull_report(manifest(None, model="tiny"), 4)
    during = status_with([pod("a"), pod("z", version=4, message=canary_report)], previous=stable, s=spec(4))
    assert during["canary"]["version"] == 4
    assert during["canary"]["model"] == {"version": 4, "manifestSha256": MANIFEST_SHA, "variant": "w8"}
    assert during["stable"]["model"] == stable["stable"]["model"]


def test_served_model_prefers_the_pods_over_the_previous_status():
    fresh = parse(REPORT)
    previous = {"stable": {"revision": "r", "model": {"version": 3, "manifestSha256": "d" * 64}}}
    pods = [{"name": "p", "revision": "r", "ready": True, "deleting": False, "model": fresh}]
    assert served_model(pods, "r", 3, previous) == fresh
    assert served_model([], "r", 3, previous) == previous["stable"]["model"]
    assert served_model([], "other", 3, previous) is None
