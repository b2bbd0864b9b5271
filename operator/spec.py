"""The LLMService API as the operator reads it: names, labels and a typed view of the spec.

The CRD (charts/llmserve/templates/crd.yaml, the one source of truth for the schema) validates and
defaults every field before the operator sees an object; the defaults are repeated here only so an
object written before a default existed still renders the same children.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib.metadata import version as _installed_version
from urllib.parse import urlsplit

from .parallelism import Parallelism
from .rollout import SERVING_FIELDS, Policy, revision_name, serving_spec
from .units import parse_duration

GROUP, VERSION, KIND, PLURAL = "llmserve.io", "v1alpha1", "LLMService", "llmservices"
API_VERSION = f"{GROUP}/{VERSION}"
MANAGER = "llmserve"

# Standard labels on every child. Prometheus relabels the pod labels into metric labels, so the
# analysis and autoscaling queries (issues 6 and 7) select on these exact keys. Pods carry their
# revision (`v<version>-<hash>`, llmserve.operator.rollout), not their track: which revision is
# stable changes at promotion, and a pod-template label change would restart every GPU pod. The
# track is on the Deployments and Services, whose metadata can change without touching pods.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SERVICE = "llmserve.io/service"
LABEL_VERSION = "llmserve.io/model-version"
LABEL_TRACK = "llmserve.io/track"
LABEL_REVISION = "llmserve.io/revision"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGER}"

STABLE, CANARY = "stable", "canary"

# Engines (docs/engines.md): which one runs the model inside Triton decides the image and what the
# model puller accepts. vllm is the default: the CRD leaves spec.runtime.engine unset rather than
# defaulting it, so services written before engines existed keep their revision.
VLLM, ONNXRUNTIME = "vllm", "onnxruntime"
DEFAULT_ENGINE = VLLM
TRITON_RELEASE = "25.08"
# The image each engine runs in unless spec.runtime.image names one (chart values
# runtime.images.*): NVIDIA's Triton image with vLLM, and ours with ONNX Runtime (model_repo/Dockerfile).
DEFAULT_RUNTIME_IMAGES = {
    VLLM: f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-vllm-python-py3",
    ONNXRUNTIME: f"llmserve/triton-onnxruntime:{_installed_version('llmserve')}",
}
NVIDIA_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:"
# What the CRD defaulted spec.runtime.image to before engines existed, stored in every LLMService
# created then. That image holds no engine our models can use, so it reads as unset: the engine's
# image serves those services (a pod-template change, not a new revision).
LEGACY_DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:25.08-py3"
_VLLM_IMAGE_TAG = re.compile(r"-vllm-python-py3(@sha256:[0-9a-f]{64})?$")
KIND_GPU, KIND_CPU, KIND_MODEL = "KIND_GPU", "KIND_CPU", "KIND_MODEL"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# Seconds a Deployment may go without progress beyond its model's startup timeout.
PROGRESS_MARGIN = 300


def deployment_name(service: str, revision: str) -> str:
    """One Deployment per served revision (`<name>-v<version>-<hash>`): its pods only ever load
    that version, with that runtime."""
    return f"{service}-{revision}"


def track_service_name(service: str, track: str) -> str:
    return f"{service}-{track}"


def child_labels(service: str, version: int, track: str) -> dict[str, str]:
    return {
        LABEL_NAME: "llmservice",
        LABEL_INSTANCE: service,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_SERVICE: service,
        LABEL_VERSION: str(version),
        LABEL_TRACK: track,
    }


def pod_labels(service: str, version: int, revision: str) -> dict[str, str]:
    """Labels of a revision's pods: immutable for the pod's life, whatever track it serves."""
    labels = child_labels(service, version, STABLE)
    del labels[LABEL_TRACK]
    return {**labels, LABEL_REVISION: revision}


def pod_selector(service: str) -> str:
    """Label selector of every pod of an LLMService (both tracks): status.selector for /scale."""
    return f"{LABEL_SERVICE}={service},{MANAGED_SELECTOR}"


@dataclass(frozen=True)
class Repository:
    """Where the model repository lives: a sub-path of a PersistentVolumeClaim in the service's
    namespace. Host paths are refused: a tenant must never mount a node's directories."""

    claim: str
    path: str = ""  # relative path inside the claim, "" for its root

    @classmethod
    def parse(cls, uri: str) -> Repository:
        """The CRD refuses anything else; this repeats the check for objects stored before it did."""
        parts = urlsplit(uri)
        segments = [s for s in parts.path.split("/") if s]
        if parts.scheme != "pvc" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"unsupported repository {uri!r}: use pvc://<claim>/<path>")
        if any(s in (".", "..") for s in segments):
            raise ValueError(f"repository {uri!r}: the path must stay inside the claim (no '.' or '..')")
        return cls(parts.netloc, "/".join(segments))


@dataclass(frozen=True)
class Autoscaling:
    """`spec.autoscaling`: who may change `spec.replicas`, within which bounds, on which signal."""

    max_replicas: int
    min_replicas: int = 1
    metric: str = "queueComputeRatio"
    target: str = "1"  # a quantity, as the HPA target is
    engine: str = "hpa"  # "hpa" (the operator's HorizontalPodAutoscaler) or "keda" (a ScaledObject)
    scale_up_window: float = 0.0  # seconds of stabilization before acting on a higher recommendation
    scale_down_window: float = 300.0  # ... on a lower one: what keeps replicas from flapping

    @classmethod
    def from_spec(cls, section: dict | None) -> Autoscaling | None:
        if not section:
            return None
        return cls(
            max_replicas=int(section["maxReplicas"]),
            min_replicas=int(section.get("minReplicas", 1)),
            metric=section.get("metric") or "queueComputeRatio",
            target=str(section.get("target") or "1"),
            engine=section.get("engine") or "hpa",
            scale_up_window=parse_duration((section.get("scaleUp") or {}).get("stabilizationWindow") or "0s"),
            scale_down_window=parse_duration((section.get("scaleDown") or {}).get("stabilizationWindow") or "5m"),
        )


def image_engine_problem(image: str | None, engine: str) -> str | None:
    """Why `image` cannot load `engine`, for the images whose contents we know (NVIDIA's Triton
    tags); None when it can or when we cannot tell (a custom image is the user's word). The CRD
    refuses the same combinations; this catches objects written before that rule."""
    if not image or not image.startswith(NVIDIA_TRITON_IMAGE):
        return None
    if engine == VLLM and _VLLM_IMAGE_TAG.search(image):
        return None
    return (f"image {image} cannot load engine {engine}: of the tritonserver images from NVIDIA only "
            "<tag>-vllm-python-py3 holds vLLM, and none holds the onnxruntime Python package; leave image "
            "unset for the default image of the engine (docs/engines.md#images)")


@dataclass(frozen=True)
class EngineSettings:
    """`spec.runtime.engineSettings`; None = not set (the artifact's engine.json or the engine decides)."""

    max_model_length: int | None = None
    gpu_memory_utilization: float | None = None
    max_concurrent_sequences: int | None = None
    prefix_caching: bool | None = None
    dtype: str | None = None
    quantization: str | None = None

    @classmethod
    def from_spec(cls, section: dict | None) -> EngineSettings:
        section = section or {}
        return cls(
            max_model_length=section.get("maxModelLength"),
            gpu_memory_utilization=section.get("gpuMemoryUtilization"),
            max_concurrent_sequences=section.get("maxConcurrentSequences"),
            prefix_caching=section.get("prefixCaching"),
            dtype=section.get("dtype"),
            quantization=section.get("quantization"),
        )


@dataclass(frozen=True)
class Spec:
    """A typed, defaulted view of one LLMService; built from the object with `Spec.from_object`."""

    name: str
    namespace: str
    uid: str
    generation: int
    model: str
    version: int
    repository: Repository
    sha256: str | None = None
    replicas: int = 1
    image: str | None = None  # None: the operator's image for the engine (render.Images.runtime)
    engine: str = DEFAULT_ENGINE
    engine_settings: EngineSettings = field(default_factory=EngineSettings)
    parallelism: Parallelism = field(default_factory=Parallelism)  # spec.runtime.parallelism
    gpus: int = 1
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    resources: dict = field(default_factory=dict)
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    affinity: dict = field(default_factory=dict)
    image_pull_secrets: list = field(default_factory=list)
    startup_timeout: float = 600.0
    shm_size: str = "256Mi"
    predictor_image: str | None = None
    predictor_resources: dict = field(default_factory=dict)
    autoscaling: Autoscaling | None = None
    serving: dict = field(default_factory=dict)  # rollout.serving_spec(): what the pods serve
    rollout: Policy = field(default_factory=Policy)
    gateway_ref: dict | None = None  # spec.rollout.traffic.gatewayRef

    @property
    def revision(self) -> str:
        return revision_name(self.serving)

    @property
    def instance_kind(self) -> str:
        """Triton's instance kind for the model: on the GPUs when the pod has any. KIND_GPU starts
        one instance per GPU (data parallel: right for ONNX Runtime); vLLM spreads one instance over
        the GPUs itself, so it gets KIND_MODEL (as Triton's vllm_backend does)."""
        if not self.gpus:
            return KIND_CPU
        return KIND_MODEL if self.engine == VLLM else KIND_GPU

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs each layer is split over (spec.runtime.parallelism.tensor): as set, else every GPU
        of the replica (1 without GPUs)."""
        return self.parallelism.tensor

    @property
    def engine_args(self) -> dict:
        """The settings the model reads from its config.pbtxt (`engine_args`), by vLLM's EngineArgs
        names; only what the spec decides, so the artifact's engine.json supplies the rest. The ONNX
        engine takes max_model_len and max_num_seqs (the CRD refuses the others for it)."""
        settings = self.engine_settings
        args = {
            "max_model_len": settings.max_model_length,
            "max_num_seqs": settings.max_concurrent_sequences,
        }
        if self.engine == VLLM:
            args |= {
                **self.parallelism.engine_args(),
                "gpu_memory_utilization": settings.gpu_memory_utilization,
                "enable_prefix_caching": settings.prefix_caching,
                "dtype": settings.dtype,
                "quantization": settings.quantization,
            }
        return {key: value for key, value in args.items() if value is not None}

    @classmethod
    def from_object(cls, obj: dict, serving: dict | None = None) -> Spec:
        """Raises ValueError for what the CRD cannot express (the message is shown in a condition).

        `serving` replaces the object's model/runtime/predictor sections: the view of a revision
        recorded in status (the stable one during a rollout) under this object's other settings.
        """
        meta, spec = obj["metadata"], obj.get("spec") or {}
        if serving is not None:
            spec = {**{k: v for k, v in spec.items() if k not in SERVING_FIELDS}, **serving}
        model, runtime, predictor = spec.get("model") or {}, spec.get("runtime") or {}, spec.get("predictor") or {}
        if not model.get("name") or not model.get("repository") or not model.get("version"):
            raise ValueError("spec.model needs name, repository and version")
        startup_timeout = parse_duration(runtime.get("startupTimeout") or "10m")
        engine = runtime.get("engine") or DEFAULT_ENGINE
        image = None if runtime.get("image") == LEGACY_DEFAULT_IMAGE else runtime.get("image") or None
        if problem := image_engine_problem(image, engine):
            raise ValueError(f"spec.runtime.{problem}")
        rollout = spec.get("rollout") or {}
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=meta.get("generation", 1),
            model=model["name"],
            version=int(model["version"]),
            repository=Repository.parse(model["repository"]),
            sha256=model.get("sha256") or None,
            replicas=int(spec.get("replicas", 1)),
            image=image,
            engine=engine,
            engine_settings=EngineSettings.from_spec(runtime.get("engineSettings")),
            parallelism=Parallelism.from_runtime(runtime),
            gpus=int(runtime.get("gpus", 1)),
            gpu_resource=runtime.get("gpuResourceName") or DEFAULT_GPU_RESOURCE,
            resources=runtime.get("resources") or {},
            node_selector=runtime.get("nodeSelector") or {},
            tolerations=runtime.get("tolerations") or [],
            affinity=runtime.get("affinity") or {},
            image_pull_secrets=runtime.get("imagePullSecrets") or [],
            startup_timeout=startup_timeout,
            shm_size=str(runtime.get("shmSize") or "256Mi"),
            predictor_image=predictor.get("image") or None,
            predictor_resources=predictor.get("resources") or {},
            autoscaling=Autoscaling.from_spec(spec.get("autoscaling")),
            serving=serving_spec(spec),
            # A canary gets as long to become ready as its Deployment has to make progress.
            rollout=Policy.from_spec(rollout, progress_deadline=startup_timeout + PROGRESS_MARGIN),
            gateway_ref=(rollout.get("traffic") or {}).get("gatewayRef") or None,
        )
