"""`llmserve compress`: quantize, prune or distill a causal LM into a new HF directory, gated
against the original teacher, with lineage. torch is imported inside the command only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..argtypes import non_negative_int
from ..cli import CommandError
from .corpus import DEFAULT_CORPUS
from .gate import FAMILIES, METHOD_FAMILY, MIN_POSITIONS
from .job import DEFAULT_IMAGE, JobError, JobRequest, claim_path, render

DEFAULT_POSITIONS = MIN_POSITIONS + 48  # 8 windows of 256


def add_commands(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser(
        "compress", help="quantize / prune / distill a causal LM into a new HF directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Apply compression methods in order to a Hugging Face causal LM, check the "
                    "result against the original teacher (mean KL, perplexity change, confident "
                    "top-1 agreement on held-out text) and write a new HF directory whose "
                    "llmserve-lineage.json records the source digest, every method and its "
                    "parameters, and the gate. `llmserve build` publishes it as usual.",
        epilog=f"methods (NAME:key=value,...): {', '.join(METHOD_FAMILY)}; an unknown key lists "
               f"a method's parameters and defaults (docs/compression.md).\n"
               f"gate families: {', '.join(FAMILIES)}")
    cmd.add_argument("source", type=Path, help="Hugging Face model directory")
    cmd.add_argument("--out", type=Path, required=True, help="new directory (must not exist)")
    cmd.add_argument("--method", action="append", required=True, metavar="NAME[:K=V,...]",
                     help="a compression method; repeat to chain them")
    cmd.add_argument("--corpus", default=DEFAULT_CORPUS,
                     help=f"calibration/distillation/gate text: {DEFAULT_CORPUS} (the Python "
                          "Language Reference shipped with CPython) or a UTF-8 text file")
    cmd.add_argument("--positions", type=int, default=DEFAULT_POSITIONS,
                     help=f"held-out positions the gate compares (at least {MIN_POSITIONS})")
    cmd.add_argument("--teacher", type=Path,
                     help="where the lineage's original teacher lives, if it moved")
    job = cmd.add_argument_group(
        "as a Kubernetes Job", "--job NAME prints a batch/v1 Job that runs this compression in the "
        "compression image instead (`| kubectl apply -f -`); SOURCE, --out and a --corpus file are "
        "then paths inside the PersistentVolumeClaim --claim, and the Job asks for --gpus GPUs "
        "(distillation trains on a GPU when it has one)")
    job.add_argument("--job", metavar="NAME", help="the Job's name")
    job.add_argument("--claim", help="PersistentVolumeClaim holding the source and receiving --out")
    job.add_argument("--namespace", default="", help="the Job's namespace (default: kubectl's)")
    job.add_argument("--image", default=DEFAULT_IMAGE, help=f"compression image (default {DEFAULT_IMAGE})")
    job.add_argument("--gpus", type=non_negative_int, default=1, help="GPUs for the Job (0: CPU only)")
    job.add_argument("--gpu-resource", default="nvidia.com/gpu", help="extended resource name of a GPU")
    job.add_argument("--cpu", default="4", help="CPU request and limit")
    job.add_argument("--memory", default="32Gi", help="memory request and limit")
    cmd.set_defaults(func=_compress)


def _job(args: argparse.Namespace) -> int:
    if not args.claim:
        raise CommandError("--job needs --claim: the PersistentVolumeClaim with the source model")
    extra = []
    if args.positions != DEFAULT_POSITIONS:
        extra += ["--positions", str(args.positions)]
    if args.teacher:
        extra += ["--teacher", claim_path(str(args.teacher), "--teacher")]
    corpus = "" if args.corpus == DEFAULT_CORPUS else args.corpus
    try:
        manifest = render(JobRequest(name=args.job, claim=args.claim, source=str(args.source), out=str(args.out),
                                     methods=args.method, namespace=args.namespace, corpus=corpus,
                                     extra_args=extra, image=args.image, gpus=args.gpus,
                                     gpu_resource=args.gpu_resource, cpu=args.cpu, memory=args.memory))
    except JobError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps(manifest, indent=2))
    return 0


def _compress(args: argparse.Namespace) -> int:
    if args.positions < MIN_POSITIONS:
        raise CommandError(f"--positions must be at least {MIN_POSITIONS}, got {args.positions}")
    from .methods import MethodError, parse  # torch

    for method in args.method:
        try:
            parse(method)
        except MethodError as exc:
            raise CommandError(str(exc)) from None
    if args.job:
        return _job(args)
    from .pipeline import CompressError, CompressRequest, compress

    try:
        result = compress(CompressRequest(source=args.source, out=args.out, methods=args.method,
                                          corpus=args.corpus, positions=args.positions,
                                          teacher=args.teacher))
    except CompressError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps({"path": str(args.out), "methods": result["methods"],
                      "gate": result["gate"]["metrics"], "family": result["gate"]["thresholds"]["family"]},
                     indent=2))
    return 0
