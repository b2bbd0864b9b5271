"""`llmserve build | verify | pull`: publish, check and install immutable model versions.

`verify` and `pull` run in the operator's model-puller init container, which has no torch: only
`build` imports the ML stack, inside its command function.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..argtypes import positive_int
from ..cli import CommandError
from .manifest import ENGINE_MARKERS, INSTANCE_KINDS, ManifestError, Serving, pull, verify_version
from .report import TERMINATION_MESSAGE_LIMIT, pull_report
from .repository import PublishError, ServingConfig


def add_commands(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser(
        "build", help="build, gate and publish a model version into a Triton model repository",
        description="Export a Hugging Face model directory (encoder or causal LM) to ONNX, optimize "
                    "it with ONNX Runtime, make the fp32/fp16/int8 variant, check it against the "
                    "fp32 PyTorch model, and publish it as the next immutable version "
                    "REPO/MODEL/N/. With --engine vllm: save the causal LM as Hugging Face files "
                    "(safetensors, tokenizer, chat template) with engine.json and model_repo/vllm's "
                    "model.py, gated by running vLLM itself against PyTorch. Nothing is published when "
                    "the accuracy gate fails.")
    build.add_argument("source", type=Path, help="Hugging Face model directory (save_pretrained)")
    build.add_argument("--repo", type=Path, required=True, help="Triton model repository")
    build.add_argument("--model", help="model name in the repository (default: source dir name)")
    build.add_argument("--kind", choices=("auto", "embedding", "generate"), default="auto",
                       help="auto: causal LMs -> generate, other encoders -> embedding")
    build.add_argument("--engine", choices=("onnxruntime", "vllm"), default="onnxruntime",
                       help="onnxruntime: ONNX artifact for model_repo/generate|embedding; vllm: Hugging "
                            "Face files for model_repo/vllm (causal LMs), gated through vLLM itself")
    build.add_argument("--variant", choices=("fp32", "fp16", "bf16", "int8", "w8", "w4"),
                       default="fp32",
                       help="weights: fp32/fp16/int8 (dynamic)/w8/w4 (weight-only MatMulNBits, "
                            "scheme from the source's compress lineage) for onnxruntime, "
                            "fp32/bf16/fp16 for vllm (for a compressed-tensors checkpoint of "
                            "`llmserve compress --method w8a8|w4a16`, published as is: the "
                            "activation dtype)")
    build.add_argument("--version", type=positive_int, help="version number (default: next)")
    build.add_argument("--max-batch-size", type=positive_int, default=32)
    build.add_argument("--instances", type=positive_int, default=1, help="model instances (CPU)")
    build.add_argument("--queue-delay-us", type=int, default=2000,
                       help="dynamic batching: max wait to form a batch (microseconds)")
    build.add_argument("--max-length", type=positive_int, help="embedding: truncate inputs to N tokens")
    build.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="extra config.pbtxt parameter, e.g. EXECUTION_ENV_PATH=... (repeatable)")
    build.add_argument("--eval-file", type=Path, help="evaluation texts, one per line")
    build.add_argument("--min-cosine", type=float, default=0.99,
                       help="embedding gate: minimum mean cosine similarity (default 0.99)")
    build.add_argument("--min-agreement", type=float, default=0.98,
                       help="causal LM gate: minimum teacher-forced next-token agreement (0.98)")
    build.add_argument("--min-greedy", type=float, default=0.0,
                       help="causal LM gate: minimum greedy agreement (default 0: report only)")
    build.add_argument("--min-confident-agreement", type=float, default=0.98,
                       help="vLLM gate of checkpoints that quantize activations (W8A8): minimum next-token "
                            "agreement where the reference's top-1 probability is >= 0.5 (0.98)")
    build.set_defaults(func=_build)

    verify = sub.add_parser("verify", help="check a model version against its manifest")
    verify.add_argument("repo", type=Path)
    verify.add_argument("model")
    verify.add_argument("version", type=positive_int)
    verify.add_argument("--sha256", help="expected sha256 of manifest.json")
    verify.set_defaults(func=_verify)

    pull_cmd = sub.add_parser(
        "pull", help="install one verified model version into a local model repository",
        description="Copy MODEL's version N from the SOURCE repository into DEST (DEST/MODEL/"
                    "config.pbtxt and DEST/MODEL/N/), verifying every file against the version's "
                    "manifest. On any mismatch nothing is left in DEST.")
    pull_cmd.add_argument("--source", type=Path, required=True, help="source model repository")
    pull_cmd.add_argument("--model", required=True)
    pull_cmd.add_argument("--version", type=positive_int, required=True)
    pull_cmd.add_argument("--sha256", help="expected sha256 of the version's manifest.json")
    pull_cmd.add_argument("--dest", type=Path, required=True, help="destination model repository")
    pull_cmd.add_argument("--engine", choices=sorted(set(ENGINE_MARKERS.values())),
                          help="refuse a version built for another engine")
    pull_cmd.add_argument("--instance-kind", choices=INSTANCE_KINDS,
                          help="Triton instance kind to write into the installed config.pbtxt")
    pull_cmd.add_argument("--engine-args", type=_json_object, default={}, metavar="JSON",
                          help="engine settings (a JSON object) to write into the installed config.pbtxt as "
                               "parameter engine_args")
    pull_cmd.add_argument("--termination-message", type=Path, metavar="PATH",
                          help="also write what was installed (model, version, manifest sha256, compact "
                               "lineage; JSON, at most 4096 bytes) or why the pull failed to PATH, the "
                               "container's terminationMessagePath (the operator publishes it in the "
                               "LLMService status); a PATH that cannot be written only gets a warning")
    pull_cmd.set_defaults(func=_pull)


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"max_model_len\": 2048}'")
    return parsed


def _params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--param expects KEY=VALUE, got {pair!r}")
        params[key] = value
    return params


def _build(args: argparse.Namespace) -> int:
    from .build import BuildError, BuildRequest, build
    from .gate import Thresholds

    texts = None
    if args.eval_file:
        try:
            texts = [line for line in args.eval_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise CommandError(f"{args.eval_file}: {exc.strerror}") from None
        if not texts:
            raise CommandError(f"{args.eval_file}: no evaluation texts")
    request = BuildRequest(
        source=args.source, repo=args.repo, model=args.model, kind=args.kind,
        variant=args.variant, version=args.version,
        serving=ServingConfig(max_batch_size=args.max_batch_size, instances=args.instances,
                              queue_delay_us=args.queue_delay_us, parameters=_params(args.param)),
        thresholds=Thresholds(min_mean_cosine=args.min_cosine,
                              min_next_token_agreement=args.min_agreement,
                              min_greedy_agreement=args.min_greedy,
                              min_confident_next_token_agreement=args.min_confident_agreement),
        eval_texts=texts, max_length=args.max_length, engine=args.engine,
    )
    try:
        result = build(request)
    except (BuildError, PublishError, ManifestError) as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps({"model": result.model, "version": result.version, "path": str(result.path),
                      "sha256": result.manifest_sha256, "accuracy": result.accuracy}, indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        manifest = verify_version(args.repo / args.model / str(args.version), args.sha256)
    except ManifestError as exc:
        raise CommandError(str(exc)) from None
    print(f"{args.model} version {args.version}: {len(manifest.files)} files match the manifest "
          f"(sha256 {manifest.sha256})")
    return 0


def _pull(args: argparse.Namespace) -> int:
    try:
        manifest = pull(args.source, args.model, args.version, args.dest, args.sha256,
                        Serving(engine=args.engine, instance_kind=args.instance_kind, engine_args=args.engine_args))
    except (ManifestError, OSError) as exc:
        message = str(exc) if isinstance(exc, ManifestError) else f"pull failed: {exc}"
        _write_termination_message(args.termination_message, message[-TERMINATION_MESSAGE_LIMIT:])
        raise CommandError(message) from None
    _write_termination_message(args.termination_message, pull_report(manifest, args.version))
    print(f"{args.model} version {args.version}: installed into {args.dest / args.model} "
          f"(manifest sha256 {manifest.sha256})", file=sys.stderr)
    return 0


def _write_termination_message(path: Path | None, text: str) -> None:
    """Best effort: the report is for the status, the pull's outcome does not depend on it."""
    if path is None:
        return
    try:
        path.write_text(text)
    except OSError as exc:
        print(f"llmserve: warning: cannot write the termination message to {path}: {exc.strerror or exc}",
              file=sys.stderr)
