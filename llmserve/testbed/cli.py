"""`llmserve testbed up | down | status | kubeconfig | model-repository | build | engine-env`."""

from __future__ import annotations

import argparse
import json
import sys

from ..argtypes import non_negative_int, positive_int


def add_commands(sub: argparse._SubParsersAction) -> None:
    testbed = sub.add_parser(
        "testbed", help="local Kubernetes test bed with simulated GPU nodes",
        description="A real control plane (etcd, kube-apiserver, controller-manager, scheduler) built "
                    "from pinned upstream Go modules, with KWOK-simulated GPU nodes. Pods are "
                    "scheduled for real but are not real processes.")
    actions = testbed.add_subparsers(dest="action", required=True, metavar="ACTION")

    up = actions.add_parser("up", help="build (first time) and start a test bed")
    _name(up)
    up.add_argument("--nodes", type=positive_int, default=4, help="simulated GPU nodes (default 4)")
    up.add_argument("--gpus", type=non_negative_int, default=8, help="nvidia.com/gpu per node (default 8)")
    up.add_argument("--taint", action="append", default=[], metavar="KEY=VALUE:EFFECT",
                    help="taint every node, e.g. nvidia.com/gpu=present:NoSchedule (repeatable)")
    up.set_defaults(func=_up)

    down = actions.add_parser("down", help="stop a test bed and delete its data")
    _name(down)
    down.add_argument("--all", action="store_true", help="every test bed on this machine")
    down.set_defaults(func=_down)

    status = actions.add_parser("status", help="components, ports and nodes (JSON)")
    _name(status)
    status.set_defaults(func=_status)

    kubeconfig = actions.add_parser("kubeconfig", help="print the admin kubeconfig path "
                                    "(export KUBECONFIG=$(llmserve testbed kubeconfig))")
    _name(kubeconfig)
    kubeconfig.set_defaults(func=_kubeconfig)

    repository = actions.add_parser(
        "model-repository", help="serve a local Triton model repository as a PersistentVolumeClaim",
        description="Create a PersistentVolume of DIR and a claim bound to it in NAMESPACE, as a cluster "
                    "administrator would; LLMServices there name it pvc://CLAIM/<path>.")
    _name(repository)
    repository.add_argument("directory", help="the Triton model repository directory")
    repository.add_argument("--namespace", "-n", default="default")
    repository.add_argument("--claim", default="models", help="claim name (default: models)")
    repository.set_defaults(func=_model_repository)

    build = actions.add_parser("build", help="build the pinned etcd/Kubernetes/KWOK/Helm binaries and those "
                               "some tests start (prometheus-adapter, LeaderWorkerSet)")
    build.set_defaults(func=_build)

    engine_env = actions.add_parser(
        "engine-env", help="install an engine's Python environment for the local tritonserver",
        description="Create or update ~/.cache/llmserve/engine-ENGINE from the requirements.txt of the "
                    "engine's models in model_repo/ (the lists its runtime image installs), with the CPU "
                    "build of GPU-only packages. The test bed's Triton runs that engine's models in it.")
    engine_env.add_argument("engine", choices=("onnxruntime", "vllm"))
    engine_env.set_defaults(func=_engine_env)


def _name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="default", help="test bed name (default: default)")


def _taint(text: str) -> dict:
    from llmserve.cli import CommandError
    try:
        key_value, effect = text.rsplit(":", 1)
        key, _, value = key_value.partition("=")
    except ValueError:
        raise CommandError(f"--taint {text!r}: expected KEY=VALUE:EFFECT") from None
    if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not key:
        raise CommandError(f"--taint {text!r}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
    return {"key": key, "value": value, "effect": effect}


def _guard(fn):
    """Turn test-bed and build failures into one-line CLI errors."""
    from llmserve.cli import CommandError
    from .cluster import TestBedError
    from .toolchain import BuildError
    try:
        return fn()
    except (TestBedError, BuildError) as exc:
        raise CommandError(str(exc)) from None


def _up(args) -> int:
    from .cluster import TestBed
    taints = [_taint(t) for t in args.taint]
    bed = TestBed(args.name)
    _guard(lambda: bed.up(nodes=args.nodes, gpus=args.gpus, taints=taints))
    ready = bed.state()["ready_seconds"]
    print(f"test bed {args.name!r} up: {args.nodes} nodes x {args.gpus} GPUs Ready in {ready}s", file=sys.stderr)
    print(f"  export KUBECONFIG={bed.kubeconfig}", file=sys.stderr)
    print(f"  export PATH={bed.bin_dir}:$PATH   # kubectl and helm of the pinned versions", file=sys.stderr)
    return 0


def _down(args) -> int:
    from .cluster import TestBed, list_testbeds
    for name in (list_testbeds() if args.all else [args.name]):
        TestBed(name).down()
        print(f"test bed {name!r} down", file=sys.stderr)
    return 0


def _status(args) -> int:
    from .cluster import TestBed
    status = _guard(TestBed(args.name).status)
    print(json.dumps(status, indent=2))
    return 0 if all(v == "running" for v in status["components"].values()) else 1


def _kubeconfig(args) -> int:
    from .cluster import TestBed
    bed = TestBed(args.name)
    _guard(bed.state)
    print(bed.kubeconfig)
    return 0


def _engine_env(args) -> int:
    from .triton import engine_requirements, install_engine_env
    print(f"installing {', '.join(engine_requirements(args.engine))}", file=sys.stderr)
    print(install_engine_env(args.engine))
    return 0


def _model_repository(args) -> int:
    from pathlib import Path

    from llmserve.cli import CommandError
    from .cluster import TestBed
    from .storage import model_repository
    if not Path(args.directory).is_dir():
        raise CommandError(f"{args.directory} is not a directory")
    uri = _guard(lambda: model_repository(TestBed(args.name), args.namespace, Path(args.directory), args.claim))
    print(f"claim {args.namespace}/{args.claim} bound: spec.model.repository: {uri}", file=sys.stderr)
    return 0


def _build(args) -> int:
    from . import toolchain
    for name, path in _guard(lambda: toolchain.ensure_all(toolchain.COMPONENTS + toolchain.ON_DEMAND)).items():
        print(f"{name}: {path}", file=sys.stderr)
    return 0
