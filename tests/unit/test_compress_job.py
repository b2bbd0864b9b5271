"""`llmserve compress --job`: the Job builder and its argument checks (pure, no cluster)."""

from __future__ import annotations

import json

import pytest

from llmserve.cli import main
from llmserve.compress.job import MOUNT, JobError, JobRequest, render


def _request(**overrides) -> JobRequest:
    return JobRequest(**{"name": "distill-smollm2", "claim": "models", "source": "smollm2",
                         "out": "students/s20", "methods": ["drop-layers:count=10", "distill:steps=300"],
                         **overrides})


def _container(job: dict) -> dict:
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


def test_the_job_runs_compress_on_claim_paths_with_a_gpu():
    job = render(_request(namespace="ml", corpus="text/corpus.txt"))
    assert job["metadata"]["namespace"] == "ml" and job["spec"]["backoffLimit"] == 0
    container = _container(job)
    assert container["command"] == [
        "llmserve", "compress", f"{MOUNT}/smollm2", "--out", f"{MOUNT}/students/s20",
        "--method", "drop-layers:count=10", "--method", "distill:steps=300", "--corpus", f"{MOUNT}/text/corpus.txt"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = job["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"][0] == {"name": "work", "persistentVolumeClaim": {"claimName": "models"}}
    assert not any("hostPath" in v for v in pod["volumes"])


def test_the_job_is_restricted_by_pod_security():
    job = render(_request())
    pod = job["spec"]["template"]["spec"]
    container = _container(job)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False


def test_a_cpu_job_asks_for_no_gpu():
    job = render(_request(gpus=0))
    assert "nvidia.com/gpu" not in _container(job)["resources"]["limits"]
    assert job["spec"]["template"]["spec"]["tolerations"] == []


@pytest.mark.parametrize("overrides, message", [
    ({"source": "/etc"}, "source '/etc' must be a relative path inside the claim"),
    ({"out": "a/../../b"}, "--out 'a/../../b' must be a relative path"),
    ({"corpus": "../secrets"}, "--corpus '../secrets'"),
    ({"name": "Distill"}, "DNS-1123 label"),
    ({"claim": "my_claim"}, "not a PersistentVolumeClaim name"),
    ({"memory": "lots"}, "memory 'lots' is not a Kubernetes quantity"),
    ({"gpu_resource": "nvidia.com/gpu!"}, "resource name"),
])
def test_bad_job_requests_name_the_field(overrides, message):
    with pytest.raises(JobError, match=message.replace("(", r"\(")):
        render(_request(**overrides))


def test_the_cli_prints_the_job_and_refuses_bad_input_in_one_line(capsys):
    assert main(["compress", "smollm2", "--out", "s20", "--method", "distill:steps=3",
                 "--job", "distill", "--claim", "models", "--gpus", "2"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    for argv, message in ((["--job", "distill"], "--job needs --claim"),
                          (["--job", "distill", "--claim", "models", "--method", "distil"], "unknown method 'distil'")):
        assert main(["compress", "smollm2", "--out", "s20", "--method", "distill", *argv]) == 1
        assert message in capsys.readouterr().err
