"""`llmserve operator run`: the LLMService operator (what the chart's Deployment runs)."""

from __future__ import annotations

import argparse
import os
from importlib.metadata import version

DEFAULT_PULLER_IMAGE = f"llmserve/llmserve:{version('llmserve')}"
DEFAULT_PREDICTOR_IMAGE = f"llmserve/predictor:{version('llmserve')}"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("operator", help="run the LLMService operator")
    sub = parser.add_subparsers(dest="operator_command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="reconcile LLMServices until stopped (SIGTERM/SIGINT)",
                         description="Reconcile LLMServices into Triton Deployments, Services and "
                                     "PodDisruptionBudgets. Only the replica holding the lease acts.")
    run.add_argument("--namespace", "-n", action="append", default=[], dest="namespaces",
                     help="watch only this namespace (repeatable; default: all namespaces)")
    run.add_argument("--kubeconfig", help="credentials file (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    run.add_argument("--no-leader-election", dest="leader_election", action="store_false",
                     help="act without holding the lease (only for a single replica)")
    run.add_argument("--lease-namespace", help="namespace of the lease (default: the credentials' namespace)")
    run.add_argument("--lease-name", default="llmserve-operator")
    run.add_argument("--lease-duration", type=float, default=30.0, metavar="SECONDS",
                     help="how long a standby waits for a silent leader before taking over (default 30)")
    run.add_argument("--health-address", default="0.0.0.0")
    run.add_argument("--health-port", type=int, default=8081, help="serves /healthz and /metrics (default 8081)")
    run.add_argument("--identity", default="", help="this replica's name in the lease (default: POD_NAME)")
    run.add_argument("--puller-image", default=os.environ.get("LLMSERVE_PULLER_IMAGE", DEFAULT_PULLER_IMAGE),
                     help="image of the model-puller init container ($LLMSERVE_PULLER_IMAGE)")
    run.add_argument("--predictor-image", default=os.environ.get("LLMSERVE_PREDICTOR_IMAGE", DEFAULT_PREDICTOR_IMAGE),
                     help="default predictor sidecar image ($LLMSERVE_PREDICTOR_IMAGE)")
    for engine in ("vllm", "onnxruntime"):
        variable = f"LLMSERVE_{engine.upper()}_IMAGE"
        run.add_argument(f"--{engine}-image", default=os.environ.get(variable, ""), metavar="IMAGE",
                         help=f"Triton image for engine {engine} when spec.runtime.image is unset (${variable}; "
                              "default: docs/engines.md#images)")
    run.add_argument("--prometheus-url", default=os.environ.get("LLMSERVE_PROMETHEUS_URL", ""),
                     help="Prometheus that scrapes the Triton pods, for KEDA autoscaling triggers and "
                          "canary analysis ($LLMSERVE_PROMETHEUS_URL)")
    run.add_argument("--prometheus-allowed-url", action="append", default=[], dest="prometheus_allowed",
                     metavar="ORIGIN", help="another Prometheus spec.rollout.analysis.prometheus.url may name: "
                                            "scheme://host:port, or scheme://host for any port (repeatable; chart "
                                            "value prometheus.allowedUrls). No other URL is ever queried.")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from ..cli import CommandError
    from .kube import ConfigError
    from .render import Images
    from .runner import Options, run
    from .spec import DEFAULT_RUNTIME_IMAGES

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":  # kopf logs every handled watch event; our Events say what changed
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.lease_duration < 3:
        raise CommandError("--lease-duration must be at least 3 seconds")
    opts = Options(
        namespaces=tuple(args.namespaces),
        images=Images(puller=args.puller_image, predictor=args.predictor_image,
                      runtime={engine: getattr(args, f"{engine}_image") or image
                               for engine, image in DEFAULT_RUNTIME_IMAGES.items()}),
        kubeconfig=args.kubeconfig, leader_election=args.leader_election, lease_namespace=args.lease_namespace,
        lease_name=args.lease_name, lease_duration=args.lease_duration, health_address=args.health_address,
        health_port=args.health_port, identity=args.identity, prometheus_url=args.prometheus_url,
        prometheus_allowed=tuple(args.prometheus_allowed),
    )
    try:
        return asyncio.run(run(opts))
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:  # e.g. the health port is taken
        raise CommandError(f"cannot start the operator: {exc}") from exc
