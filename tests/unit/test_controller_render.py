"""The pure builder: LLMService spec -> desired children."""

import json

import pytest

from llmserve.operator.render import Images, Tracks, desired_children, puller_command
from llmserve.operator.spec import DEFAULT_RUNTIME_IMAGES, Repository, Spec, image_engine_problem
from llmserve.operator.tritoncmd import tritonserver_command

IMAGES = Images(puller="llmserve/llmserve:test", predictor="llmserve/predictor:test")
STANDARD_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                   "llmserve.io/service", "llmserve.io/model-version", "llmserve.io/track"}


def make(spec=None, **meta):
    obj = {"metadata": {"name": "chat", "namespace": "team-a", "uid": "uid-1", "generation": 4, **meta},
           "spec": {"model": {"name": "tiny-gpt", "repository": "pvc://models/model_repo", "version": 3},
                    **(spec or {})}}
    return Spec.from_object(obj)


def children(spec=None):
    return {(c["kind"], c["metadata"]["name"]): c for c in desired_children(make(spec), IMAGES)}


def deployment(spec=None):
    return children(spec)["Deployment", f"chat-{make(spec).revision}"]


def pod(spec=None):
    return deployment(spec)["spec"]["template"]["spec"]


def container(spec, name):
    return next(c for c in pod(spec)["containers"] + pod(spec)["initContainers"] if c["name"] == name)


def test_children_names_labels_and_owner():
    kids = children()
    revision = make().revision
    assert revision.startswith("v3-")
    assert set(kids) == {("Deployment", f"chat-{revision}"), ("Service", "chat"), ("Service", "chat-stable"),
                         ("Service", "chat-canary"),
                         ("PodDisruptionBudget", "chat")}
    for child in kids.values():
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert STANDARD_LABELS <= set(meta["labels"])
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "llmserve"
        assert meta["ownerReferences"] == [{"apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
                                            "name": "chat", "uid": "uid-1", "controller": True}]
    template = deployment()["spec"]["template"]
    # Pods carry their revision, not their track: promotion must not change the pod template.
    assert "llmserve.io/track" not in template["metadata"]["labels"]
    assert template["metadata"]["labels"]["llmserve.io/model-version"] == "3"
    assert template["metadata"]["labels"]["llmserve.io/revision"] == revision
    assert deployment()["metadata"]["labels"]["llmserve.io/track"] == "stable"


def test_selectors_tie_each_deployment_to_one_revision_and_services_to_tracks():
    kids, revision = children(), make().revision
    assert deployment()["spec"]["selector"]["matchLabels"] == {
        "llmserve.io/service": "chat", "llmserve.io/revision": revision}
    assert kids["Service", "chat"]["spec"]["selector"] == {"llmserve.io/service": "chat"}
    # The entry Service has every port a track Service has: a service needs no track Service
    # until a rollout (decide() creates them only then).
    assert [p["port"] for p in kids["Service", "chat"]["spec"]["ports"]] == [8080, 8000, 8001, 8002]
    stable = kids["Service", "chat-stable"]["spec"]
    assert stable["selector"] == {"llmserve.io/service": "chat", "llmserve.io/revision": revision}
    # Without a rollout the canary Service selects the stable pods: a route to it never dead-ends.
    assert kids["Service", "chat-canary"]["spec"]["selector"] == stable["selector"]
    assert [p["port"] for p in stable["ports"]] == [8080, 8000, 8001, 8002]
    pdb = kids["PodDisruptionBudget", "chat"]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_pod_security_is_restricted():
    spec = pod()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts  # writable scratch despite the read-only root
    assert {v["name"]: v.get("emptyDir") for v in spec["volumes"]}["dshm"] == {"medium": "Memory",
                                                                            "sizeLimit": "256Mi"}


def test_triton_uses_the_shared_command_and_gpu_resources():
    triton = container({"runtime": {"gpus": 2, "resources": {"limits": {"memory": "16Gi"},
                                                             "requests": {"cpu": "4"}}}}, "tritonserver")
    assert triton["command"] == tritonserver_command("/models", ["tiny-gpt"])
    assert triton["resources"] == {"requests": {"cpu": "4"}, "limits": {"memory": "16Gi", "nvidia.com/gpu": "2"}}
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in triton["volumeMounts"]


def test_cpu_only_pods_ask_for_no_gpu_and_render_no_empty_resources():
    triton = container({"runtime": {"gpus": 0}}, "tritonserver")
    assert "resources" not in triton
    assert "resources" not in container(None, "predictor")


def test_probes_are_sized_to_the_model_load_time():
    triton = container({"runtime": {"startupTimeout": "25m"}}, "tritonserver")
    startup = triton["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/models/tiny-gpt/versions/3/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] == 25 * 60
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    slow = deployment({"runtime": {"startupTimeout": "25m"}})
    assert slow["spec"]["progressDeadlineSeconds"] > 25 * 60


def test_placement_comes_from_the_spec_and_is_omitted_when_empty():
    placement = {"nodeSelector": {"nvidia.com/gpu.product": "A100"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                 "affinity": {"nodeAffinity": {"x": 1}}, "imagePullSecrets": [{"name": "ngc"}]}
    spec = pod({"runtime": placement})
    for key, value in placement.items():
        assert spec[key] == value
    assert not set(placement) & set(pod())


def test_puller_fetches_exactly_one_version_and_verifies_the_digest():
    digest = "a" * 64
    puller = container({"model": {"name": "tiny-gpt", "repository": "pvc://models/model_repo", "version": 3,
                                  "sha256": digest}}, "model-puller")
    assert puller["image"] == IMAGES.puller
    assert puller["command"] == ["llmserve", "pull", "--source", "/repository/model_repo", "--model", "tiny-gpt",
                                 "--version", "3", "--dest", "/models",
                                 "--termination-message", "/dev/termination-log", "--engine", "vllm",
                                 "--instance-kind", "KIND_MODEL", "--engine-args", '{"tensor_parallel_size":1}',
                                 "--sha256", digest]
    # What it installed reaches the status through its termination message (puller_report).
    assert (puller["terminationMessagePath"], puller["terminationMessagePolicy"]) == ("/dev/termination-log", "File")
    volumes = {v["name"]: v for v in pod()["volumes"]}
    assert volumes["repository"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_the_claim_root_is_the_repository_when_the_uri_has_no_path():
    spec = make({"model": {"name": "m", "repository": "pvc://models", "version": 1}})
    assert puller_command(spec)[:4] == ["llmserve", "pull", "--source", "/repository"]
    volume = desired_children(spec, IMAGES)[0]["spec"]["template"]["spec"]["volumes"][0]
    assert volume == {"name": "repository", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}


def test_predictor_sidecar_contract():
    predictor = container({"predictor": {"image": "custom/predictor:1"}}, "predictor")
    assert predictor["image"] == "custom/predictor:1"
    assert predictor["command"] == ["llmserve", "predictor", "--triton-grpc", "localhost:8001",
                                    "--http-port", "8080", "--model", "tiny-gpt"]
    assert container(None, "predictor")["image"] == IMAGES.predictor


def test_rendering_is_deterministic():
    assert desired_children(make(), IMAGES) == desired_children(make(), IMAGES)


@pytest.mark.parametrize("uri,expected", [
    ("pvc://models/model_repo", Repository("models", "model_repo")),
    ("pvc://models/a/b/", Repository("models", "a/b")),
    ("pvc://models", Repository("models")),
])
def test_repository_uris(uri, expected):
    assert Repository.parse(uri) == expected


@pytest.mark.parametrize("uri", ["s3://bucket/repo", "file:///srv/repo", "file://host/repo", "/srv/repo", "pvc:///x",
                                 "hostpath:///var/lib"])
def test_unsupported_repository_uris(uri):
    with pytest.raises(ValueError, match="unsupported repository"):
        Repository.parse(uri)


@pytest.mark.parametrize("uri", ["pvc://models/../../etc", "pvc://models/a/..", "pvc://models/./a"])
def test_repository_paths_stay_inside_the_claim(uri):
    with pytest.raises(ValueError, match="inside the claim"):
        Repository.parse(uri)


def test_a_rollout_renders_both_revisions_and_points_each_track_service_at_its_own():
    stable, canary = make(), make({"model": {"name": "tiny-gpt", "repository": "pvc://models/model_repo", "version": 4}})
    kids = {(c["kind"], c["metadata"]["name"]): c
            for c in desired_children(stable, IMAGES, Tracks(stable, 2, canary, 1))}
    old, new = kids["Deployment", f"chat-{stable.revision}"], kids["Deployment", f"chat-{canary.revision}"]
    assert (old["spec"]["replicas"], old["metadata"]["labels"]["llmserve.io/track"]) == (2, "stable")
    assert (new["spec"]["replicas"], new["metadata"]["labels"]["llmserve.io/track"]) == (1, "canary")
    assert new["spec"]["template"]["metadata"]["labels"]["llmserve.io/model-version"] == "4"
    assert kids["Service", "chat-stable"]["spec"]["selector"]["llmserve.io/revision"] == stable.revision
    assert kids["Service", "chat-canary"]["spec"]["selector"]["llmserve.io/revision"] == canary.revision
    assert kids["Service", "chat"]["spec"]["selector"] == {"llmserve.io/service": "chat"}  # both tracks


# -- engines (issue 10) ------------------------------------------------------------------------


def pull_flags(spec=None):
    """The puller's --flag value pairs after --dest (what reaches the pulled config.pbtxt)."""
    argv = puller_command(make(spec))
    tail = argv[argv.index("--dest") + 2:]
    return dict(zip(tail[::2], tail[1::2]))


def test_gpu_pods_run_the_model_on_the_gpu_and_cpu_pods_on_the_cpu():
    gpu, cpu = pull_flags({"runtime": {"gpus": 2}}), pull_flags({"runtime": {"gpus": 0}})
    # vLLM: one model instance spread over the pod's GPUs, as Triton's vllm_backend does.
    assert gpu["--instance-kind"] == "KIND_MODEL" and cpu["--instance-kind"] == "KIND_CPU"
    # ONNX Runtime: one instance per GPU.
    assert pull_flags({"runtime": {"gpus": 2, "engine": "onnxruntime"}})["--instance-kind"] == "KIND_GPU"
    assert pull_flags({"runtime": {"gpus": 0, "engine": "onnxruntime"}})["--instance-kind"] == "KIND_CPU"
    assert "nvidia.com/gpu" not in container({"runtime": {"gpus": 0}}, "tritonserver").get("resources", {}).get(
        "limits", {})


def test_tensor_parallelism_defaults_to_every_gpu_of_the_pod():
    assert json.loads(pull_flags({"runtime": {"gpus": 4}})["--engine-args"]) == {"tensor_parallel_size": 4}
    assert json.loads(pull_flags({"runtime": {"gpus": 0}})["--engine-args"]) == {"tensor_parallel_size": 1}
    two = {"runtime": {"gpus": 4, "parallelism": {"tensor": 2, "pipeline": 2}}}
    assert json.loads(pull_flags(two)["--engine-args"]) == {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}


def test_engine_settings_reach_the_puller_by_vllm_names():
    settings = {"maxModelLength": 4096, "gpuMemoryUtilization": 0.85, "maxConcurrentSequences": 64,
                "prefixCaching": False, "dtype": "bfloat16", "quantization": "fp8"}
    flags = pull_flags({"runtime": {"gpus": 1, "engineSettings": settings}})
    assert flags["--engine"] == "vllm"
    assert json.loads(flags["--engine-args"]) == {
        "max_model_len": 4096, "gpu_memory_utilization": 0.85, "max_num_seqs": 64, "enable_prefix_caching": False,
        "dtype": "bfloat16", "quantization": "fp8", "tensor_parallel_size": 1}


def test_onnxruntime_gets_only_its_settings_and_no_tensor_parallelism():
    flags = pull_flags({"runtime": {"engine": "onnxruntime", "gpus": 2,
                                    "engineSettings": {"maxConcurrentSequences": 8}}})
    assert flags["--engine"] == "onnxruntime"
    assert json.loads(flags["--engine-args"]) == {"max_num_seqs": 8}
    assert "--engine-args" not in pull_flags({"runtime": {"engine": "onnxruntime"}})


def test_engine_settings_are_part_of_the_revision():
    assert make().revision != make({"runtime": {"engineSettings": {"maxConcurrentSequences": 8}}}).revision
    assert make().revision != make({"runtime": {"engine": "onnxruntime"}}).revision


def test_default_image_follows_the_engine_and_an_explicit_image_wins():
    assert container(None, "tritonserver")["image"] == DEFAULT_RUNTIME_IMAGES["vllm"]
    assert DEFAULT_RUNTIME_IMAGES["vllm"].endswith("-vllm-python-py3")
    onnx = container({"runtime": {"engine": "onnxruntime"}}, "tritonserver")
    assert onnx["image"] == DEFAULT_RUNTIME_IMAGES["onnxruntime"]
    assert container({"runtime": {"image": "registry.example/triton:1"}}, "tritonserver")["image"] == (
        "registry.example/triton:1")
    ours = Images(puller="p", predictor="q", runtime={"vllm": "mirror/vllm:1", "onnxruntime": "mirror/ort:1"})
    triton = desired_children(make({"runtime": {"engine": "onnxruntime"}}), ours)[0]
    assert triton["spec"]["template"]["spec"]["containers"][0]["image"] == "mirror/ort:1"


@pytest.mark.parametrize("image,engine,loads", [
    ("nvcr.io/nvidia/tritonserver:25.08-vllm-python-py3", "vllm", True),
    ("nvcr.io/nvidia/tritonserver:25.08-vllm-python-py3@sha256:" + "0" * 64, "vllm", True),
    ("nvcr.io/nvidia/tritonserver:25.07-py3", "vllm", False),
    ("nvcr.io/nvidia/tritonserver:25.08-trtllm-python-py3", "vllm", False),
    ("nvcr.io/nvidia/tritonserver:25.07-py3", "onnxruntime", False),
    ("nvcr.io/nvidia/tritonserver:25.08-vllm-python-py3", "onnxruntime", False),
    ("llmserve/triton-onnxruntime:0.1.0", "onnxruntime", True),
    ("registry.example/custom-triton:1", "vllm", True),  # a custom image is the user's word
])
def test_images_that_cannot_load_the_engine_are_refused(image, engine, loads):
    assert (image_engine_problem(image, engine) is None) is loads
    if not loads:
        with pytest.raises(ValueError, match=f"cannot load engine {engine}.*docs/engines.md"):
            make({"runtime": {"image": image, "engine": engine}})


def test_shm_is_sized_for_tensor_parallelism():
    def shm(runtime):
        return {v["name"]: v for v in pod({"runtime": runtime})["volumes"]}["dshm"]["emptyDir"]["sizeLimit"]

    assert shm({"gpus": 1}) == "256Mi"
    assert shm({"gpus": 4}) == "4Gi"
    assert shm({"gpus": 4, "parallelism": {"tensor": 2, "pipeline": 2}}) == "4Gi"  # every GPU of the pod
    assert shm({"gpus": 4, "shmSize": "8Gi"}) == "8Gi"  # more than the floor stays as asked
    assert shm({"gpus": 4, "engine": "onnxruntime"}) == "256Mi"  # no tensor parallelism


def test_the_image_the_crd_used_to_default_reads_as_unset():
    """Services created before engines store the old default image, which holds no engine: they get
    the engine's image, with the same revision (a pod-template change, not a rollout)."""
    legacy = {"runtime": {"image": "nvcr.io/nvidia/tritonserver:25.08-py3"}}
    assert container(legacy, "tritonserver")["image"] == DEFAULT_RUNTIME_IMAGES["vllm"]
    # The revision is still made of the stored spec, old image included: no rollout of its own.
    assert make(legacy).serving["runtime"]["image"] == "nvcr.io/nvidia/tritonserver:25.08-py3"
