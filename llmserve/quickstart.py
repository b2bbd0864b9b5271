"""`llmserve quickstart`: the whole platform on this machine, in one command.

Test bed up → chart installed → operator running (as the chart's ServiceAccount) → a model
artifact built and published → an LLMService applied and Ready → the data plane the operator
rendered for it run locally (pods on the test bed are simulated, so the pod's own commands run
here: the puller init container, tritonserver, the predictor sidecar) → a chat completion through
the official `openai` client.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

QUESTION = "What is the capital of France?"
MODELS = {  # --model choice -> (testmodels source function, published model name, vLLM variant, default engine)
    "smollm2": ("smollm2", "smollm2", "bf16", "vllm"),
    # The fast CI path stays on ONNX Runtime: vLLM's engine start and its accuracy gate through
    # vLLM take minutes on a busy 2-core machine, the ONNX tiny model seconds.
    "tiny": ("tiny_lm", "tiny-gpt", "fp32", "onnxruntime"),
}
ENGINES = ("vllm", "onnxruntime")
# This machine has no GPU, so the pods' data plane runs on vLLM's CPU build, which needs two
# settings a GPU pod does not: eager mode (compiled mode takes minutes to start on the CPU) and a KV
# budget in bytes (gpu_memory_utilization would mean a fraction of the whole host's memory).
LOCAL_CPU_ENGINE_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}


def add_commands(sub: argparse._SubParsersAction) -> None:
    quickstart = sub.add_parser(
        "quickstart", help="test bed + chart + operator + model + LLMService + a chat completion",
        description=__doc__.split("\n\n")[1])
    quickstart.add_argument("--name", default="quickstart", help="test bed name (default: quickstart)")
    quickstart.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                            help="smollm2: SmolLM2-135M-Instruct, a real small chat model (default); "
                                 "tiny: a 2-layer test LM, fast but answers gibberish")
    quickstart.add_argument("--engine", choices=ENGINES,
                            help="vllm: Hugging Face files on vLLM's engine (default for smollm2); onnxruntime: "
                                 "an optimized ONNX artifact on ONNX Runtime (default for tiny)")
    quickstart.add_argument("--service", default="chat", help="LLMService name (default: chat)")
    quickstart.add_argument("--question", default=QUESTION, help="what to ask")
    quickstart.add_argument("--serve", action="store_true",
                            help="keep the operator and the data plane running until Ctrl-C")
    quickstart.add_argument("--down", action="store_true",
                            help="remove the test bed at the end (default: keep it for kubectl)")
    quickstart.set_defaults(func=run)


def step(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from llmserve.cli import CommandError
    from llmserve.testbed.local_operator import OperatorError
    from llmserve.testbed.local_predictor import PredictorError
    from llmserve.testbed.cluster import TestBedError
    from llmserve.testbed.toolchain import BuildError
    from llmserve.testbed.triton import TritonError

    try:
        return _run(args)
    except (TestBedError, BuildError, OperatorError, TritonError, PredictorError, QuickstartError) as exc:
        raise CommandError(str(exc)) from None


class QuickstartError(RuntimeError):
    pass


def _run(args: argparse.Namespace) -> int:
    from llmserve.environments import cache_root
    from llmserve.testbed.local_operator import LocalOperator, install_chart, service_account_kubeconfig
    from llmserve.testbed.cluster import TestBed, TestBedError
    from llmserve.testbed.storage import MODEL_CLAIM, model_repository

    args.engine = args.engine or MODELS[args.model][3]

    started = time.monotonic()
    work = cache_root() / "quickstart"
    work.mkdir(parents=True, exist_ok=True)
    bed = TestBed(args.name)
    with ExitStack() as stack:
        if args.down:
            stack.callback(bed.down)
        try:
            bed.state()
            step(f"test bed {args.name!r} is already up")
        except TestBedError:
            step(f"starting test bed {args.name!r} (4 nodes x 8 simulated GPUs)")
            bed.up()

        step("installing the Helm chart charts/llmserve")
        install_chart(bed)

        step("starting the operator as the chart's ServiceAccount")
        kubeconfig = service_account_kubeconfig(bed, work / "operator.kubeconfig")
        operator = LocalOperator(kubeconfig, work / "operator.log").start()
        stack.callback(operator.stop)
        operator.wait_leading()

        model, version, digest, repo = publish_model(args.model, args.engine, work / "model_repo")

        step(f"making {repo} the model repository claim {MODEL_CLAIM} (a PersistentVolume and a claim, bound)")
        repository = model_repository(bed, "default", repo)
        step(f"applying LLMService {args.service} (model {model} v{version} from {repository})")
        bed.apply(llmservice(args.service, model, version, digest, repository, args.engine))
        wait = bed.kubectl("wait", "--for=condition=Ready", f"llms/{args.service}", "--timeout=300s",
                           check=False, timeout=320)
        if wait.returncode != 0:
            status = bed.kubectl("get", "llms", args.service, "-o", "jsonpath={.status}", check=False)
            raise QuickstartError(f"LLMService {args.service} did not become Ready: {wait.stderr.strip()}\n"
                                  f"status: {status.stdout}\noperator log:\n{operator.log()}")
        print(bed.kubectl("get", "llms", args.service, "-o", "wide").stdout, file=sys.stderr)

        deployment = served_deployment(bed, args.service)
        answer = run_data_plane_and_ask(deployment, bed, args, stack, work)
        print(answer)
        step(f"done in {time.monotonic() - started:.0f}s")
        if not args.down:
            print(f"  export KUBECONFIG={bed.kubeconfig}\n"
                  f"  kubectl get llms,deployments,services,pods -l llmserve.io/service={args.service}\n"
                  f"  llmserve testbed down --name {args.name}   # when finished", file=sys.stderr)
        if args.serve:
            step("serving until Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def publish_model(choice: str, engine: str, repo: Path) -> tuple[str, int, str, Path]:
    """Build the chosen model for ``engine`` into ``repo`` unless a version of the same source
    for that engine is there already; returns (model name, version, manifest sha256, repo)."""
    from llmserve.artifacts import testmodels
    from llmserve.artifacts.build import BuildRequest, build, source_sha256
    from llmserve.artifacts.manifest import ENGINE_MARKERS, MANIFEST, sha256_file

    source_fn, model, vllm_variant, _ = MODELS[choice]
    step(f"preparing the source model ({choice})")
    source = getattr(testmodels, source_fn)()
    source_digest = source_sha256(source)
    for manifest_path in sorted((repo / model).glob(f"*/{MANIFEST}"), reverse=True):
        manifest = json.loads(manifest_path.read_text())
        built_for = {e for marker, e in ENGINE_MARKERS.items() if marker in manifest.get("files", {})}
        if manifest.get("source", {}).get("sha256") == source_digest and built_for == {engine}:
            step(f"reusing {model} version {manifest_path.parent.name} built from the same source for {engine}")
            return model, int(manifest_path.parent.name), sha256_file(manifest_path), repo
    if engine == "vllm":
        step(f"building a vLLM artifact of {model} into {repo} (Hugging Face files {vllm_variant}, "
             "accuracy gate through vLLM)")
        request = BuildRequest(source=source, repo=repo, model=model, variant=vllm_variant, engine="vllm")
    else:
        step(f"building an optimized artifact of {model} into {repo} (ONNX export, optimization, accuracy gate)")
        request = BuildRequest(source=source, repo=repo, model=model, variant="fp32")
    result = build(request)
    return result.model, result.version, result.manifest_sha256, repo


def llmservice(name: str, model: str, version: int, digest: str, repository: str, engine: str) -> dict:
    return {
        "apiVersion": "llmserve.io/v1alpha1", "kind": "LLMService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"name": model, "repository": repository, "version": version, "sha256": digest},
            "replicas": 1,
            "runtime": {"gpus": 1, "engine": engine},
        },
    }


def served_deployment(bed, service: str) -> dict:
    """The Deployment the operator chose to serve the stable track."""
    items = json.loads(bed.kubectl("get", "deployments", "-n", "default", "-l",
                                   f"llmserve.io/service={service},llmserve.io/track=stable",
                                   "-o", "json").stdout)["items"]
    if len(items) != 1:
        raise QuickstartError(f"expected one stable Deployment of {service}, found {len(items)}")
    return items[0]


def local_command(container: dict, mounts: dict[str, Path]) -> list[str]:
    """The container's command with volume mount paths mapped to local directories and the
    ``llmserve`` entry point run from this Python."""
    argv = []
    for arg in container["command"] + container.get("args", []):
        for mount_path, local in mounts.items():
            if arg == mount_path or arg.startswith(mount_path + "/"):
                arg = str(local) + arg[len(mount_path):]
            elif "=" + mount_path in arg:
                arg = arg.replace("=" + mount_path, "=" + str(local))
        argv.append(arg)
    return [sys.executable, "-m", "llmserve", *argv[1:]] if argv[0] == "llmserve" else argv


def on_this_cpu(argv: list[str], engine: str) -> list[str]:
    """The puller's command for this GPU-less machine (the test bed's GPUs are simulated): the
    model's instances on the CPU and, for vLLM's CPU build, ``LOCAL_CPU_ENGINE_ARGS`` over the
    engine settings the operator rendered."""
    argv = list(argv)
    changes = {"--instance-kind": "KIND_CPU"}
    if engine == "vllm":
        rendered = json.loads(argv[argv.index("--engine-args") + 1]) if "--engine-args" in argv else {}
        changes["--engine-args"] = json.dumps({**rendered, **LOCAL_CPU_ENGINE_ARGS})
    for flag, value in changes.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    step(f"no GPU here: the model runs on the CPU ({', '.join(f'{k} {v}' for k, v in changes.items())})")
    return argv


def run_data_plane_and_ask(deployment: dict, bed, args, stack: ExitStack, work: Path) -> str:
    from openai import OpenAI

    from llmserve.testbed.local_predictor import LocalPredictor
    from llmserve.testbed.storage import claim_directory
    from llmserve.testbed.triton import TritonServer

    pod = deployment["spec"]["template"]["spec"]
    version = int(deployment["metadata"]["labels"]["llmserve.io/model-version"])
    scratch = Path(tempfile.mkdtemp(prefix="data-plane-", dir=work))
    stack.callback(shutil.rmtree, scratch, True)
    mounts = {}
    for volume in pod["volumes"]:
        for container in pod.get("initContainers", []) + pod["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] == volume["name"]:
                    # What the kubelet would mount: the claim's volume, or a fresh emptyDir.
                    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                    mounts[mount["mountPath"]] = (claim_directory(bed, deployment["metadata"]["namespace"], claim)
                                                  if claim else scratch / volume["name"])
    for path in mounts.values():
        path.mkdir(parents=True, exist_ok=True)

    puller = pod["initContainers"][0]
    argv = on_this_cpu(local_command(puller, mounts), args.engine)
    step(f"running the pod's init container locally: {' '.join(puller['command'])}")
    pulled = subprocess.run(argv, capture_output=True, text=True)
    if pulled.returncode != 0:
        raise QuickstartError(f"the model puller refused the artifact:\n{pulled.stderr or pulled.stdout}")

    triton = next(c for c in pod["containers"] if c["name"] == "tritonserver")
    models_dir = next(mounts[m["mountPath"]] for m in triton["volumeMounts"] if m["name"] == "models")
    model = next(a.split("=", 1)[1] for a in triton["command"] if a.startswith("--load-model="))
    step(f"starting tritonserver on the pulled artifact ({model} v{version}, explicit model control)")
    server = stack.enter_context(TritonServer(models_dir, {model: version}, startup_timeout=600))
    step("starting the predictor sidecar (OpenAI + V2 APIs)")
    predictor = stack.enter_context(LocalPredictor(server.grpc_url, model, startup_timeout=300))

    step(f"asking via the openai client at {predictor.openai_base_url}: {args.question!r}")
    client = OpenAI(base_url=predictor.openai_base_url, api_key="unused")
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": args.question}], max_tokens=48, temperature=0)
    return reply.choices[0].message.content
