"""`llmserve compress --job` on the test bed: the rendered Job is admitted in a namespace that
enforces the restricted Pod Security Standard, the Job controller's pod is scheduled onto a GPU
node with the claim bound, and the pod's command, run here as the kubelet would (the claim's
directory at the mount path; KWOK runs no containers), distills the tiny LM into the claim. KWOK
reports a Job's pods Succeeded (its pod-complete stage), so the Job controller completes the Job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from fixtures.operator import get_json, wait_for
from llmserve.compress.job import MOUNT
from llmserve.compress.lineage import LINEAGE_FILE
from llmserve.testbed import storage

pytestmark = pytest.mark.cluster


def _scheduled_pod(testbed, namespace: str, job: str):
    pods = (get_json(testbed, "pods", "-n", namespace, "-l", f"job-name={job}") or {}).get("items", [])
    return next((p for p in pods if p["spec"].get("nodeName")), None)


def test_a_distillation_job_runs_on_a_gpu_node_and_writes_into_the_claim(testbed, namespace, tiny_lm_source,
                                                                        zen_corpus, tmp_path):
    claim = tmp_path / "claim"
    shutil.copytree(tiny_lm_source, claim / "tiny-lm")
    shutil.copy(zen_corpus, claim / "zen.txt")
    storage.model_repository(testbed, namespace, claim, claim="work")
    try:
        testbed.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
        rendered = subprocess.run(
            [sys.executable, "-m", "llmserve", "compress", "tiny-lm", "--out", "students/tiny",
             "--method", "narrow-mlp:keep=0.75", "--method", "distill:steps=4,batch=2,seq_len=64",
             "--corpus", "zen.txt", "--job", "distill-tiny", "--claim", "work", "--namespace", namespace,
             "--image", "llmserve/compress:test"], capture_output=True, text=True, timeout=120)
        assert rendered.returncode == 0, rendered.stderr
        testbed.apply(json.loads(rendered.stdout))

        pod = wait_for(lambda: _scheduled_pod(testbed, namespace, "distill-tiny"), "the Job's pod scheduled", timeout=120)
        node = get_json(testbed, "node", pod["spec"]["nodeName"])
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
        [container] = pod["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"

        argv = [str(claim / arg[len(MOUNT) + 1:]) if arg.startswith(MOUNT + "/") else arg
                for arg in container["command"]]
        env = {e["name"]: e["value"] for e in container["env"]} | {"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
        done = subprocess.run([sys.executable, "-m", "llmserve", *argv[1:]], capture_output=True, text=True,
                              timeout=600, env={**env, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        lineage = json.loads((claim / "students" / "tiny" / LINEAGE_FILE).read_text())
        assert [m["name"] for m in lineage["methods"]] == ["narrow-mlp", "distill"]
        assert "distill: step 4/4" in done.stderr and "CPU threads" in done.stderr  # no GPU on this machine

        wait_for(lambda: (get_json(testbed, "job", "distill-tiny", "-n", namespace) or {}).get("status", {}).get("succeeded"),
                 "the Job complete", timeout=120)
    finally:
        storage.release(testbed, namespace, "work")
