"""Data-plane benchmark: what each serving stack delivers on this machine's CPU, side by side.

Embeddings: naive PyTorch serving vs our gated MiniLM int8 artifact on Triton (requests/s).

Generation (issue 10, item 8): SmolLM2-135M-Instruct through an OpenAI `/v1/completions` stream
on four stacks in one run. All stacks are started first and stay up (idle ones cost no CPU); each
level then runs `--rounds` times with the stacks taking turns, never two at once, so load from
elsewhere on a shared machine falls on every stack alike; rows are the medians of the rounds
(the slow baselines, eager and onnx, run `--baseline-rounds` of them, default 1):

- `eager`: transformers eager PyTorch (fp32) behind a minimal OpenAI-compatible server that
  serves one request at a time, as a naive deployment does;
- `onnx`: the ONNX Runtime artifact (`llmserve build`, fp32) on the real tritonserver, behind
  the predictor, as in its pod;
- `vllm-triton`: the vLLM artifact (`llmserve build --engine vllm`, bf16) in tritonserver's
  python backend (model_repo/vllm) on vLLM's CPU build, behind the predictor, as in its pod;
- `vllm`: vLLM alone, its own OpenAI server in the same engine environment with the same engine
  arguments and environment (the ceiling for vllm-triton).

Each level is closed-loop: `streams` clients, each sending its next request when its stream has
ended, `--requests-per-stream` requests each, greedy, `max_tokens` fixed. Prompt mixes: `short`
(one sentence) and `mixed` (one request in eight has a distinct ~1,000-token prompt). Reported per
stack and level: output tokens/s, time to first token p50/p99 and inter-token gap p99 (between
consecutive streamed chunks), then the goals: vllm-triton >= 1.5x onnx tokens/s at 64 short
streams, >= 8x at 64 mixed, p99 TTFT <= 1/5 of onnx's, and within 15 % of vLLM alone.

    python bench/dataplane.py                                   # embeddings + generation
    python bench/dataplane.py --only generate                   # the four LLM stacks
    python bench/dataplane.py --only generate --systems vllm-triton,vllm --rounds 5   # the 15 % goal
    python bench/dataplane.py --only generate --lm tiny --systems onnx,vllm-triton   # smoke run
    python bench/dataplane.py --only embedding --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np

from llmserve.artifacts import client, gate, testmodels
from llmserve.artifacts.manifest import Serving, pull
from llmserve.testbed.local_predictor import LocalPredictor
from llmserve.testbed.procs import free_ports
from llmserve.environments import engine_env
from llmserve.testbed.triton import TritonServer

SHORT_PROMPTS = gate.LM_PROMPTS + [
    "The best way to learn a new language is",
    "In the morning, I usually",
]
SYSTEMS = ("eager", "onnx", "vllm-triton", "vllm")
BASELINES = ("eager", "onnx")
VLLM_ENGINE_ENV = engine_env("vllm")
# Both vLLM stacks run with these over the artifact's engine.json: eager mode (compiled mode takes
# minutes to start on the CPU) and a KV budget in bytes (the published GPU-memory fraction would
# mean most of host memory on the CPU build); and no core reserved for the serving process (the
# CPU build's default halves a 2-core machine).
VLLM_CPU_ENGINE_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 2 << 30}
VLLM_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


# -- the baseline server (runs as a child process: `--serve-baseline`) ----------------------------


def serve_baseline(kind: str, source: str, port: int) -> None:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from llmserve.artifacts.build import EncoderForEmbedding, _sentence_transformers_pooling

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if kind == "embedding":
        pooling, normalize = _sentence_transformers_pooling(Path(source))
        model = EncoderForEmbedding(AutoModel.from_pretrained(source, attn_implementation="eager"),
                                    pooling, normalize).eval()

        def answer(body):
            enc = tokenizer([body["text"]], truncation=True, max_length=256, return_tensors="pt")
            return {"embedding": model(**enc)[0].tolist()}
    else:
        model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
        eos = model.generation_config.eos_token_id

        class Streamer:
            """transformers' streamer interface: ``put`` gets the prompt, then each new token."""

            def __init__(self, emit):
                self.emit, self.prompt_seen, self.tokens = emit, False, 0

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    self.tokens += 1
                    self.emit(tokenizer.decode([token], skip_special_tokens=True))

            def end(self):
                pass

        def complete(body, emit):
            """An OpenAI completion stream: greedy, ``max_tokens`` new tokens at most."""
            ids = tokenizer(body["prompt"], return_tensors="pt")
            streamer = Streamer(emit)
            model.generate(**ids, max_new_tokens=body["max_tokens"], do_sample=False, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id or eos, streamer=streamer)
            return {"prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": streamer.tokens}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/completions":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

                def event(data):
                    self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
                    self.wfile.flush()

                usage = complete(body, lambda text: event({"choices": [{"index": 0, "text": text}]}))
                event({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                return
            data = json.dumps(answer(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # readiness
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    class Server(HTTPServer):
        request_queue_size = 256  # waiting clients queue in the backlog instead of timing out

    Server(("127.0.0.1", port), Handler).serve_forever()  # one request at a time


class ServerProcess:
    """A benchmark-owned HTTP server process on a free loopback port, ready when ``ready_path``
    answers; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, argv: list[str], ready_path: str = "/", env: dict[str, str] | None = None,
                 timeout: float = 600, log: Path | None = None):
        (self.port,) = free_ports(1)
        argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}{ready_path}", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{argv[:4]} did not start (log: {log})")
                time.sleep(0.5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


class Baseline(ServerProcess):
    def __init__(self, kind: str, source: Path):
        super().__init__([sys.executable, __file__, "--serve-baseline", kind, str(source), "{port}"], timeout=300)

    def call(self, body: dict) -> dict:
        req = urllib.request.Request(f"{self.url}/", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())


# -- embeddings: closed-loop threads against Triton -----------------------------------------------


def run_level(call, work: list, concurrency: int) -> dict:
    """Closed loop: `concurrency` clients share the `work` items; returns timing and answers."""
    latencies, answers = [0.0] * len(work), [None] * len(work)
    cursor = iter(range(len(work)))
    lock = threading.Lock()
    local = threading.local()

    def worker():
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            start = time.perf_counter()
            answers[i] = call(work[i], local)
            latencies[i] = time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return {"wall": time.perf_counter() - start, "latencies": latencies, "answers": answers}


def summarize(level: dict, units: float) -> dict:
    lat = np.array(level["latencies"]) * 1000
    return {"throughput": units / level["wall"], "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def bench_embeddings(args, repo_root: Path) -> dict:
    built = testmodels.cached_build(testmodels.minilm(), "minilm", "embedding", "int8")
    texts = (gate.EMBEDDING_TEXTS * (args.requests // len(gate.EMBEDDING_TEXTS) + 1))[:args.requests]
    dest = repo_root / "embedding"
    pull(built.repo, built.name, built.version, dest)
    results = {}
    baseline = Baseline("embedding", built.source)
    try:
        for c in args.concurrency:
            level = run_level(lambda text, _: baseline.call({"text": text})["embedding"], texts, c)
            results[("baseline", c)] = (summarize(level, len(texts)), np.array(level["answers"]))
    finally:
        baseline.stop()
    with TritonServer(dest, {"minilm": 1}) as server:
        def call(text, local):
            if not hasattr(local, "http"):
                local.http = client.httpclient.InferenceServerClient(server.http_address)
            return client.embed(local.http, "minilm", [text])[0][0]

        for c in args.concurrency:
            level = run_level(call, texts, c)
            results[("triton", c)] = (summarize(level, len(texts)), np.array(level["answers"]))
    report = {}
    for c in args.concurrency:
        base, ours = results[("baseline", c)], results[("triton", c)]
        accuracy = gate.cosine_metrics(base[1], ours[1])["mean_cosine"]
        report[c] = {"baseline": base[0], "triton": ours[0], "mean_cosine": accuracy}
    return report


def print_embeddings(title: str, report: dict, goal_at: int, goal: float) -> None:
    print(f"\n{title}")
    print(f"{'clients':>7} | {'baseline req/s':>18} {'p50 ms':>8} {'p99 ms':>8} | "
          f"{'triton req/s':>16} {'p50 ms':>8} {'p99 ms':>8} | {'ratio':>6} | accuracy")
    for c, row in report.items():
        b, t = row["baseline"], row["triton"]
        print(f"{c:>7} | {b['throughput']:>18.1f} {b['p50_ms']:>8.1f} {b['p99_ms']:>8.1f} | "
              f"{t['throughput']:>16.1f} {t['p50_ms']:>8.1f} {t['p99_ms']:>8.1f} | "
              f"{t['throughput'] / b['throughput']:>5.2f}x | mean_cosine={row['mean_cosine']:.4f}")
    if goal_at in report:
        row = report[goal_at]
        ratio = row["triton"]["throughput"] / row["baseline"]["throughput"]
        print(f"goal: >= {goal:.0f}x at {goal_at} clients -> {ratio:.2f}x ({'met' if ratio >= goal else 'NOT met'})")


# -- generation: OpenAI streams against each stack ------------------------------------------------


def long_prompt(index: int, tokens: int = 1000) -> str:
    """A distinct ~``tokens``-token English prompt (about 4.5 characters per SmolLM2 token): its
    first sentence names ``index``, so no two share a cached prefix."""
    items = ("crates of apples", "rolls of cable", "boxes of nails", "sacks of flour", "drums of oil")
    sentences, n = [f"Logbook {index}, port of call number {index * 7 + 3}."], 0
    while sum(len(s) for s in sentences) < tokens * 4.5:
        n += 1
        sentences.append(f"On day {n} the ship unloaded {(index + n) * 13 % 97} {items[(index + n) % 5]} "
                         f"at dock {(index * n) % 11} before noon.")
    return " ".join(sentences) + " Summarize the logbook:"


def workload(mix: str, requests: int) -> list[str]:
    prompts = [SHORT_PROMPTS[i % len(SHORT_PROMPTS)] for i in range(requests)]
    if mix == "mixed":
        prompts = [long_prompt(i) if i % 8 == 7 else p for i, p in enumerate(prompts)]
    return prompts


@dataclass
class Stream:
    ttft: float  # seconds from sending to the first text
    gaps: list[float]  # between consecutive text chunks
    tokens: int


@dataclass
class Level:
    wall: float
    streams: list[Stream] = field(default_factory=list)

    def summary(self) -> dict:
        ttft = np.array([s.ttft for s in self.streams]) * 1000
        gaps = np.array([g for s in self.streams for g in s.gaps] or [0.0]) * 1000
        tokens = sum(s.tokens for s in self.streams)
        return {"tokens_per_s": tokens / self.wall, "ttft_p50_ms": float(np.percentile(ttft, 50)),
                "ttft_p99_ms": float(np.percentile(ttft, 99)), "itl_p99_ms": float(np.percentile(gaps, 99)),
                "tokens": tokens, "requests": len(self.streams), "wall_s": self.wall}


async def _stream(http, url: str, model: str, prompt: str, max_tokens: int) -> Stream:
    import orjson

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    async with http.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = orjson.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{url}: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event["choices"]):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError(f"{url}: a stream without text")
    return Stream(times[0] - start, list(np.diff(times)), tokens or len(times))


async def _level(url: str, model: str, prompts: list[str], streams: int, max_tokens: int) -> Level:
    import httpx

    queue = list(reversed(prompts))
    results: list[Stream] = []
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    # A stack whose engine died (the ONNX model's process OOM-killed) leaves streams open: ten
    # minutes without a byte fails the level instead of hanging the run.
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, read=600.0), limits=limits) as http:
        async def client():
            while queue:
                results.append(await _stream(http, url, model, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(streams)))
        return Level(time.perf_counter() - start, results)


def measure_level(url: str, model: str, mix: str, streams: int, args) -> dict:
    """One (mix, streams) level against one stack: its summary, or the error that ended it."""
    prompts = workload(mix, streams * args.requests_per_stream)
    try:
        return asyncio.run(_level(url, model, prompts, streams, args.max_tokens)).summary()
    except Exception as exc:  # noqa: BLE001 - reported in the table; later levels still run
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def median_rounds(rounds: list[dict]) -> dict:
    """A level's rounds as one row: the median of each metric, the rounds kept beside it. A
    level that failed in any round is reported as failed."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    row = {key: float(np.median([r[key] for r in rounds])) for key in rounds[0]}
    return {**row, "rounds": rounds}


@contextmanager
def serve(system: str, source: Path, name: str, work: Path, args) -> Iterator[str]:
    """Start ``system`` on ``source`` and yield its OpenAI base URL."""
    work.mkdir(parents=True, exist_ok=True)
    if system == "eager":
        baseline = Baseline("generate", source)
        try:
            yield f"{baseline.url}/v1"
        finally:
            baseline.stop()
        return
    if system == "onnx":
        built = testmodels.cached_build(source, name, "generate", "fp32")
        dest = work / "onnx"
        pull(built.repo, built.name, built.version, dest)
        with (TritonServer(dest, {name: 1}, startup_timeout=600) as triton,
              LocalPredictor(triton.grpc_url, name, max_concurrency=256, startup_timeout=300) as predictor):
            yield predictor.openai_base_url
        return
    built = testmodels.cached_build(source, name, "generate", args.vllm_variant, engine="vllm")
    version = built.path
    engine_args = {**json.loads((version / "engine.json").read_text()), **VLLM_CPU_ENGINE_ARGS, **args.engine_args}
    os.environ.update(VLLM_ENV)  # tritonserver and its python backend stub inherit it
    if system == "vllm-triton":
        dest = work / "vllm"
        pull(built.repo, name, built.version, dest, serving=Serving(engine="vllm", instance_kind="KIND_CPU",
                                                                    engine_args=engine_args))
        with (TritonServer(dest, {name: 1}, startup_timeout=900) as triton,  # in the engine env
              LocalPredictor(triton.grpc_url, name, max_concurrency=256, startup_timeout=300) as predictor):
            yield predictor.openai_base_url
        return
    config = work / "vllm-serve.yaml"  # JSON is YAML; vLLM turns each key into its --flag
    config.write_text(json.dumps({k.replace("_", "-"): v for k, v in engine_args.items()
                                  if k not in ("model", "tokenizer")}))
    server = ServerProcess([str(VLLM_ENGINE_ENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                            "--model", str(version), "--served-model-name", name, "--host", "127.0.0.1",
                            "--port", "{port}", "--config", str(config)],
                           ready_path="/health", env={**VLLM_ENV, "LC_ALL": "C.UTF-8"}, timeout=900,
                           log=work / "vllm-serve.log")
    try:
        yield f"{server.url}/v1"
    finally:
        server.stop()


GOALS = [  # (label, level, metric, ours, theirs, bound on ours/theirs)
    (">= 1.5x onnx tokens/s, 64 short streams", "short/64", "tokens_per_s", "vllm-triton", "onnx", 1.5),
    (">= 8x onnx tokens/s, 64 mixed streams", "mixed/64", "tokens_per_s", "vllm-triton", "onnx", 8.0),
    ("<= 1/5 of onnx p99 TTFT, 64 mixed streams", "mixed/64", "ttft_p99_ms", "vllm-triton", "onnx", 0.2),
]


def print_generation(title: str, report: dict) -> None:
    print(f"\n{title}")
    print(f"{'level':>10} | {'stack':>11} | {'tok/s':>8} | {'TTFT p50':>9} | {'TTFT p99':>9} | {'ITL p99':>8}")
    levels = sorted({lvl for rows in report.values() for lvl in rows}, key=lambda k: (k.split("/")[0] != "short",
                                                                                      int(k.split("/")[1])))
    for level in levels:
        for system in SYSTEMS:
            row = report.get(system, {}).get(level)
            if row and "error" in row:
                print(f"{level:>10} | {system:>11} | failed: {row['error']}")
            elif row:
                print(f"{level:>10} | {system:>11} | {row['tokens_per_s']:>8.1f} | {row['ttft_p50_ms']:>7.0f}ms | "
                      f"{row['ttft_p99_ms']:>7.0f}ms | {row['itl_p99_ms']:>6.0f}ms")
    print("goals (vllm-triton):")
    for label, level, metric, ours, theirs, bound in GOALS:
        a, b = report.get(ours, {}).get(level), report.get(theirs, {}).get(level)
        if a and b and "error" not in a and "error" not in b:
            ratio = a[metric] / b[metric]
            met = ratio <= bound if metric.startswith("ttft") else ratio >= bound
            print(f"  {label}: {ratio:.2f}x ({'met' if met else 'NOT met'})")
    for level in levels:
        a, b = report.get("vllm-triton", {}).get(level), report.get("vllm", {}).get(level)
        if a and b and "error" not in a and "error" not in b:
            ratio = a["tokens_per_s"] / b["tokens_per_s"]
            print(f"  within 15% of vLLM alone, {level}: {ratio:.2f}x ({'met' if ratio >= 0.85 else 'NOT met'})")


def bench_generate(args, work: Path) -> dict:
    """Every stack is started first and stays up; then each level runs `--rounds` times, the stacks
    taking turns within a round (the order rotated each round), so a burst of load from elsewhere
    on a shared machine falls on all of them instead of on whichever ran at that time. An idle
    stack costs no CPU. Each row is the median of its rounds. The baselines (eager, onnx) run only
    the first `--baseline-rounds` rounds: they are several times slower (minutes per mixed level),
    and the goals against them are ratios of 1.5x and more, which one round settles."""
    source = testmodels.smollm2() if args.lm == "smollm2" else testmodels.tiny_lm()
    rounds: dict[str, dict[str, list[dict]]] = {system: {} for system in args.systems}
    with ExitStack() as stack:
        urls = {}
        for system in args.systems:
            print(f"start {system} ...", file=sys.stderr, flush=True)
            urls[system] = stack.enter_context(serve(system, source, args.lm, work / system, args))
            asyncio.run(_level(urls[system], args.lm, SHORT_PROMPTS[:2], 2, args.max_tokens))  # warm-up
        for mix in args.mixes:
            for streams in args.streams:
                level = f"{mix}/{streams}"
                for turn in range(args.rounds):
                    order = args.systems[turn % len(args.systems):] + args.systems[:turn % len(args.systems)]
                    for system in order:
                        if turn >= args.baseline_rounds and system in BASELINES:
                            continue
                        row = measure_level(urls[system], args.lm, mix, streams, args)
                        rounds[system].setdefault(level, []).append(row)
                        print(f"  {level:>9} round {turn + 1} {system:>11} {row}", file=sys.stderr, flush=True)
    return {system: {level: median_rounds(rows) for level, rows in levels.items()}
            for system, levels in rounds.items()}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-baseline":
        serve_baseline(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("embedding", "generate"))
    parser.add_argument("--requests", type=int, default=192, help="embedding requests per level")
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="embedding client counts")
    parser.add_argument("--lm", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS),
                        help=f"generation stacks, in order (default: {','.join(SYSTEMS)})")
    parser.add_argument("--streams", type=_ints, default=[16, 64], help="concurrent streams per level")
    parser.add_argument("--mixes", type=lambda s: s.split(","), default=["short", "mixed"])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each level, the stacks taking turns; rows are medians")
    parser.add_argument("--baseline-rounds", type=int, default=1,
                        help=f"rounds the baselines ({', '.join(BASELINES)}) run (at most --rounds)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vllm-variant", choices=("bf16", "fp32"), default="bf16",
                        help="weights of the vLLM artifact (bf16: what vLLM's CPU build runs best)")
    parser.add_argument("--engine-args", type=json.loads, default={},
                        help="JSON vLLM engine arguments over engine.json and the CPU defaults (both vLLM stacks)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    unknown = set(args.systems) - set(SYSTEMS) or set(args.mixes) - {"short", "mixed"}
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    results = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="llmserve-bench-") as tmp:
        if args.only in (None, "embedding"):
            report = bench_embeddings(args, Path(tmp))
            print_embeddings(f"Embeddings (MiniLM-L6 int8, {args.requests} requests of 1 text)", report, 32, 5)
            results["embedding"] = {str(k): v for k, v in report.items()}
        if args.only in (None, "generate"):
            report = bench_generate(args, Path(tmp))
            print_generation(f"Generation ({args.lm}, {args.max_tokens} output tokens, greedy, "
                             f"{args.requests_per_stream} requests per stream; load average before "
                             f"{results['load_average_before'][1]:.1f}, after {os.getloadavg()[1]:.1f})", report)
            results["generate"] = report
    results["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
