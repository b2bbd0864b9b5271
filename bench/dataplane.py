"""Data-plane benchmark: naive PyTorch serving vs our gated ONNX artifact on Triton.

Baseline: transformers eager PyTorch (fp32) behind a plain single-threaded HTTP server that
handles one request at a time, as the seeds' Flask example deploys a model. Ours: the artifact
`llmserve build` publishes, pulled like the pod's init container does and served by the real
tritonserver with dynamic batching. Both run on this machine's CPU, loopback only, with the
same closed-loop clients (each client sends its next request when the previous one is answered)
and a bounded number of requests per level.

    python bench/dataplane.py                       # embeddings (MiniLM int8) + LLM (SmolLM2 fp32)
    python bench/dataplane.py --only embedding --requests 64
    python bench/dataplane.py --lm tiny             # quick run with the tiny test LM

Reported per concurrency level: throughput (requests/s; for generation tokens/s), p50 and p99
latency, and accuracy against the baseline's answers (mean cosine for embeddings, exact greedy
text matches for generation). Goals: embeddings >= 5x baseline throughput at 32 clients, LLM
generation >= 2x baseline tokens/s at 16 concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np

from llmserve.artifacts import client, gate, testmodels
from llmserve.artifacts.manifest import pull
from llmserve.testbed.procs import free_ports
from llmserve.testbed.triton import TritonServer

GENERATE_PROMPTS = gate.LM_PROMPTS + [
    "The best way to learn a new language is",
    "In the morning, I usually",
]


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

        def answer(body):
            ids = tokenizer(body["prompt"], return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=body["max_tokens"], do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos)
            new = out[0, ids["input_ids"].shape[1]:]
            new = [t for t in new.tolist() if t not in ([eos] if isinstance(eos, int) else eos)]
            return {"text": tokenizer.decode(new, skip_special_tokens=True),
                    "completion_tokens": len(new)}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
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
        request_queue_size = 128  # waiting clients queue in the backlog instead of timing out

    Server(("127.0.0.1", port), Handler).serve_forever()  # one request at a time


class Baseline:
    def __init__(self, kind: str, source: Path):
        (self.port,) = free_ports(1)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-baseline", kind,
                                      str(source), str(self.port)])
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the baseline server did not start")
                time.sleep(0.5)

    def call(self, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


# -- load generation ----------------------------------------------------------------------------


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


def bench_generate(args, repo_root: Path) -> dict:
    source = testmodels.smollm2() if args.lm == "smollm2" else testmodels.tiny_lm()
    built = testmodels.cached_build(source, args.lm, "generate", "fp32")
    dest = repo_root / "generate"
    pull(built.repo, built.name, built.version, dest)
    prompts = (GENERATE_PROMPTS * (args.gen_requests // len(GENERATE_PROMPTS) + 1))
    prompts = prompts[:args.gen_requests]
    results = {}
    baseline = Baseline("generate", source)
    try:
        for c in args.gen_concurrency:
            level = run_level(lambda p, _: baseline.call({"prompt": p,
                                                          "max_tokens": args.max_tokens}),
                              prompts, c)
            tokens = sum(a["completion_tokens"] for a in level["answers"])
            results[("baseline", c)] = (summarize(level, tokens), [a["text"] for a in level["answers"]])
    finally:
        baseline.stop()
    with TritonServer(dest, {built.name: 1}) as server:
        def call(prompt, _):
            (answer,) = client.generate(server.grpc_url, built.name,
                                        [{"prompt": prompt, "max_tokens": args.max_tokens}])
            if answer.error:
                raise RuntimeError(answer.error)
            return answer

        for c in args.gen_concurrency:
            level = run_level(call, prompts, c)
            tokens = sum(a.completion_tokens for a in level["answers"])
            results[("triton", c)] = (summarize(level, tokens), [a.text for a in level["answers"]])
    report = {}
    for c in args.gen_concurrency:
        base, ours = results[("baseline", c)], results[("triton", c)]
        same = sum(a == b for a, b in zip(base[1], ours[1]))
        report[c] = {"baseline": base[0], "triton": ours[0], "greedy_match": f"{same}/{len(base[1])}"}
    return report


def print_report(title: str, unit: str, report: dict, accuracy_key: str, goal_at: int,
                 goal: float) -> None:
    print(f"\n{title}")
    print(f"{'clients':>7} | {'baseline ' + unit:>18} {'p50 ms':>8} {'p99 ms':>8} | "
          f"{'triton ' + unit:>16} {'p50 ms':>8} {'p99 ms':>8} | {'ratio':>6} | accuracy")
    for c, row in report.items():
        b, t = row["baseline"], row["triton"]
        print(f"{c:>7} | {b['throughput']:>18.1f} {b['p50_ms']:>8.1f} {b['p99_ms']:>8.1f} | "
              f"{t['throughput']:>16.1f} {t['p50_ms']:>8.1f} {t['p99_ms']:>8.1f} | "
              f"{t['throughput'] / b['throughput']:>5.2f}x | {accuracy_key}={_fmt(row[accuracy_key])}")
    if goal_at in report:
        row = report[goal_at]
        ratio = row["triton"]["throughput"] / row["baseline"]["throughput"]
        verdict = "met" if ratio >= goal else "NOT met"
        print(f"goal: >= {goal:.0f}x at {goal_at} clients -> {ratio:.2f}x ({verdict})")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-baseline":
        serve_baseline(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("embedding", "generate"))
    parser.add_argument("--requests", type=int, default=192, help="embedding requests per level")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 32], help="embedding client counts")
    parser.add_argument("--lm", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--gen-requests", type=int, default=32, help="generations per level")
    parser.add_argument("--gen-concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 16], help="generation client counts")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmserve-bench-") as tmp:
        if args.only in (None, "embedding"):
            report = bench_embeddings(args, Path(tmp))
            print_report(f"Embeddings (MiniLM-L6 int8, {args.requests} requests of 1 text)",
                         "req/s", report, "mean_cosine", 32, 5)
        if args.only in (None, "generate"):
            report = bench_generate(args, Path(tmp))
            print_report(f"Generation ({args.lm} fp32, {args.gen_requests} requests x "
                         f"{args.max_tokens} tokens, greedy)", "tok/s", report, "greedy_match",
                         16, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
