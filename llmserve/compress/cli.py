"""`llmserve compress`: quantize, prune or distill a causal LM into a new HF directory, gated
against the original teacher, with lineage. torch is imported inside the command only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import CommandError
from .corpus import DEFAULT_CORPUS
from .gate import FAMILIES, METHOD_FAMILY, MIN_POSITIONS


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
    cmd.add_argument("--positions", type=int, default=MIN_POSITIONS + 48,
                     help=f"held-out positions the gate compares (at least {MIN_POSITIONS})")
    cmd.add_argument("--teacher", type=Path,
                     help="where the lineage's original teacher lives, if it moved")
    cmd.set_defaults(func=_compress)


def _compress(args: argparse.Namespace) -> int:
    from .pipeline import CompressError, CompressRequest, compress

    if args.positions < MIN_POSITIONS:
        raise CommandError(f"--positions must be at least {MIN_POSITIONS}, got {args.positions}")
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
