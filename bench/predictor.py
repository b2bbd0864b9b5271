"""Predictor overhead over direct Triton, and streaming time to first token (issue 5, item 6).

The built test artifacts (the tiny LM as `generate`, MiniLM int8 as `embedding`; cached like the
test fixtures) each run as in their pod: a local tritonserver and `llmserve predictor` in front of
it. Each row sends the same work two ways, alternating request by request so drift (other load on
the machine, CPU frequency) hits both sides alike, one client, loopback only:

- baseline: straight to Triton with tritonclient (gRPC; HTTP for the V2 row);
- predictor: the same request through the predictor's HTTP API.

It reports medians (and p90) of each side, the overhead (predictor p50 - baseline p50, goal
<= 1 ms), the ratio, and the CPU the predictor process spent per request (from /proc; unlike
wall time it does not grow when other processes compete for the cores). Clients are lean on
purpose (http.client, httpx, tritonclient), so the numbers are the predictor's cost, not a client
library's parsing.

Run (after hack/setup.sh):
    ~/.cache/llmserve/venv/bin/python bench/predictor.py [--iterations 200]
Results are also written as JSON to bench/results/predictor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient

from llmserve.artifacts import client as triton_client
from llmserve.artifacts import testmodels
from llmserve.testbed.local_predictor import LocalPredictor
from llmserve.testbed.triton import TritonServer

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
TEXT = "Kubernetes-native serving of optimized model artifacts on Triton."
STREAM_TOKENS = 16


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Pair:
    """Baseline and predictor timings of one row, collected alternately, and the predictor's CPU."""

    def __init__(self, name: str, predictor: LocalPredictor) -> None:
        self.name = name
        self.pid = predictor.pid
        self.baseline: list[float] = []
        self.predictor: list[float] = []
        self.cpu = 0.0

    def add(self, baseline: float, predictor: float, cpu: float) -> None:
        self.baseline.append(baseline)
        self.predictor.append(predictor)
        self.cpu += cpu

    def summary(self) -> dict[str, float | str]:
        def ms(values: list[float], q: float) -> float:
            return float(np.quantile(values, q)) * 1000

        base, ours = statistics.median(self.baseline) * 1000, statistics.median(self.predictor) * 1000
        return {"row": self.name, "n": len(self.predictor), "baseline_p50_ms": base, "predictor_p50_ms": ours,
                "baseline_p90_ms": ms(self.baseline, 0.9), "predictor_p90_ms": ms(self.predictor, 0.9),
                "overhead_p50_ms": ours - base, "ratio": ours / base,
                "predictor_cpu_ms_per_request": self.cpu / len(self.predictor) * 1000}


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run_sync(pair: Pair, baseline: Callable[[], object], predictor: Callable[[], object], iterations: int,
             warmup: int) -> Pair:
    for i in range(warmup + iterations):
        b = timed(baseline)
        cpu = cpu_seconds(pair.pid)
        p = timed(predictor)
        if i >= warmup:
            pair.add(b, p, cpu_seconds(pair.pid) - cpu)
    return pair


class Http:
    """One persistent HTTP/1.1 connection: POST JSON, read the whole body."""

    def __init__(self, url: str) -> None:
        self.conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)

    def post(self, path: str, body: dict) -> bytes:
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path} -> {response.status}: {data[:300]!r}")
        return data


def bench_embeddings(triton: TritonServer, predictor: LocalPredictor, iterations: int, warmup: int) -> list[Pair]:
    model = predictor.model
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    text = np.array([[TEXT.encode()]], dtype=np.object_)

    def grpc_inputs(module):
        tensor = module.InferInput("text", [1, 1], "BYTES")
        tensor.set_data_from_numpy(text)
        return [tensor]

    client = Http(predictor.url)
    openai_row = run_sync(
        Pair("embeddings, 1 text: gRPC infer vs POST /v1/embeddings", predictor),
        lambda: grpc.infer(model, grpc_inputs(grpcclient)),
        lambda: client.post("/v1/embeddings", {"model": model, "input": TEXT, "encoding_format": "float"}),
        iterations, warmup)

    direct_http = httpclient.InferenceServerClient(triton.http_address)
    via_http = httpclient.InferenceServerClient(predictor.url.removeprefix("http://"))
    v2_row = run_sync(
        Pair("V2 infer, embedding: Triton HTTP vs predictor /v2 (tritonclient.http)", predictor),
        lambda: direct_http.infer(model, grpc_inputs(httpclient)),
        lambda: via_http.infer(model, grpc_inputs(httpclient)),
        iterations, warmup)
    grpc.close()
    direct_http.close()
    via_http.close()
    return [openai_row, v2_row]




async def bench_generate(triton: TritonServer, predictor: LocalPredictor, iterations: int, warmup: int) -> list[Pair]:
    """Decoupled generation: one gRPC stream per request on the baseline side, as the predictor does."""
    model = predictor.model
    grpc = grpcaio.InferenceServerClient(triton.grpc_url)
    http = httpx.AsyncClient(base_url=predictor.url, timeout=60)

    async def direct(max_tokens: int, stream: bool) -> float:
        """Seconds to the first response; the stream is always drained."""
        async def one():
            yield {"model_name": model,
                   "inputs": triton_client.generate_inputs(PROMPT, max_tokens=max_tokens, stream=stream)}

        start, first = time.perf_counter(), None
        async for result, error in grpc.stream_infer(one()):
            if error is not None:
                raise RuntimeError(error)
            first = first or time.perf_counter() - start
        return first

    async def completion() -> float:
        start = time.perf_counter()
        response = await http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 1})
        response.raise_for_status()
        return time.perf_counter() - start

    async def first_token() -> float:
        """Seconds to the first SSE event carrying text; the stream is always drained."""
        body = {"model": model, "prompt": PROMPT, "max_tokens": STREAM_TOKENS, "stream": True}
        start, first = time.perf_counter(), None
        async with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {") and '"text":""' not in line:
                    first = time.perf_counter() - start
        return first

    rows = [(Pair("completion, max_tokens=1: gRPC stream vs POST /v1/completions", predictor),
             lambda: direct(1, False), completion),
            (Pair(f"stream time to first token ({STREAM_TOKENS} tokens): gRPC stream vs SSE", predictor),
             lambda: direct(STREAM_TOKENS, True), first_token)]
    for i in range(warmup + iterations):
        for row, baseline, ours in rows:
            b = await baseline()
            cpu = cpu_seconds(row.pid)
            p = await ours()
            if i >= warmup:
                row.add(b, p, cpu_seconds(row.pid) - cpu)
    await grpc.close()
    await http.aclose()
    return [row for row, _, _ in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200, help="measured requests per side and row")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    if not 1 <= args.iterations <= 5000:
        parser.error("--iterations must be between 1 and 5000")
    generate = testmodels.cached_build(testmodels.tiny_lm(), "tiny-lm", "generate", "fp32")
    embedding = testmodels.cached_build(testmodels.minilm(), "minilm", "embedding", "int8")

    with ExitStack() as stack:
        def serve(built: testmodels.BuiltModel) -> tuple[TritonServer, LocalPredictor]:
            triton = stack.enter_context(TritonServer(built.repo, {built.name: built.version}))
            return triton, stack.enter_context(LocalPredictor(triton.grpc_url, built.name))

        rows = bench_embeddings(*serve(embedding), args.iterations, args.warmup)
        rows += asyncio.run(bench_generate(*serve(generate), args.iterations, args.warmup))

    results = [row.summary() for row in rows]
    print(f"\n{'row':<74} {'base p50':>9} {'ours p50':>9} {'overhead':>9} {'ratio':>6} {'our CPU':>9}")
    for r in results:
        print(f"{r['row']:<74} {r['baseline_p50_ms']:>7.2f}ms {r['predictor_p50_ms']:>7.2f}ms "
              f"{r['overhead_p50_ms']:>7.2f}ms {r['ratio']:>6.2f} {r['predictor_cpu_ms_per_request']:>7.2f}ms")
    print(f"load average during the run: {os.getloadavg()[1]:.1f} on {os.cpu_count()} cores")
    out = Path(__file__).resolve().parent / "results" / "predictor.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"iterations": args.iterations, "loadavg_5m": os.getloadavg()[1],
                               "results": results}, indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
