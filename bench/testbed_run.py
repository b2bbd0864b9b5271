"""Shared frame of the test-bed benchmarks: a fresh test bed (or a running one), a scratch
directory, and the result saved to bench/results/<name>.json and printed."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmserve.testbed.cluster import TestBed

RESULTS = Path(__file__).resolve().parent / "results"


def run_on_testbed(name: str, reuse: str | None, run: Callable[[TestBed, Path], dict],
                   nodes: int = 2, gpus: int = 8) -> int:
    bed = TestBed(reuse or f"bench-{name}")
    if not reuse:
        print(f"[bench] starting a test bed with {nodes} nodes of {gpus} GPUs", file=sys.stderr, flush=True)
        bed.up(nodes=nodes, gpus=gpus)
    try:
        with tempfile.TemporaryDirectory(prefix=f"llmserve-bench-{name}-") as tmp:
            result = run(bed, Path(tmp))
    finally:
        if not reuse:
            bed.down()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0
