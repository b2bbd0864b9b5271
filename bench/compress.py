"""Compression methods side by side in one run (issue 12, item 6).

For one source model (SmolLM2-135M-Instruct by default; `--source DIR` for another) each row
compresses with `llmserve compress` (gate against the original teacher on held-out text of the
Python reference), builds the ONNX artifact (`w8`/`w4` MatMulNBits for the quantized rows, fp32
otherwise) and measures:
- gate: mean KL, perplexity change, confident top-1 agreement (and refusals, which still report
  their metrics but are not built);
- size: bytes of the HF weights (safetensors, fp32) and of the ONNX artifact;
- output tokens/s of the ONNX engine's own generation loop (the shipped model_repo/generate
  model.py, continuous batching) at `--streams` concurrent greedy streams of `--tokens` tokens,
  and the peak resident memory of that process (each row in a fresh child process);
- with `--engines vllm`, for the rows of VLLM_ROWS: output tokens/s of vLLM's CPU build (bf16 artifact, OpenAI server,
  `--streams` streams of short prompts, 2 requests each, `--tokens` tokens) through
  bench/dataplane.py's serving and measuring code, with its engine arguments (enforce_eager,
  2 GiB KV cache, VLLM_CPU_NUM_OF_RESERVED_CPU=0); every row's server is started first, then the
  rows take turns for `--rounds` rounds and report medians (a shared machine's load bursts fall
  on all rows alike);
- peak resident memory of the compression step (each row compresses in a child process).

A refused row is still measured for speed (its model is kept in the benchmark's temporary
directory only), so a structural cut's speed can be weighed against its quality; the
pruned+distilled row also reports the share of the pruned row's perplexity gap that
distillation closed.

SmolLM2 here is de-quantized from a Q4_1 GGUF: its weights already sit on a 4-bit grid
(asymmetric, blocks of 32), which flatters any 4-bit result; the table says so.

Run: ~/.cache/llmserve/venv/bin/python bench/compress.py [--rows baseline,int8,...]
Results are also written as JSON to bench/results/compress.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "compress.json"
ROW_FILE = "bench-row.json"  # a row's compression record beside its model (`--work`)

# name -> (compress methods, ONNX build variant); baseline: the source itself. The
# compressed-tensors rows (llmcompressor) serve on vLLM only: no ONNX variant.
ROWS = {
    "baseline": ([], "fp32"),
    "int8": (["quantize-int8"], "w8"),
    "int4": (["quantize-int4"], "w4"),
    "int4-float-zero": (["quantize-int4:zero_point=float"], "w4"),  # each block's min and max on the grid
    "2of4": (["prune-2of4:score=wanda"], "fp32"),
    "sparsegpt": (["sparsegpt-2of4:samples=16"], "fp32"),  # llmcompressor; a dense checkpoint with zeros
    "pruned": (["drop-layers:count={drop}"], "fp32"),
    "pruned+distilled": (["drop-layers:count={drop}", "distill:steps={steps},{distill}"], "fp32"),
    "w8a8": (["w8a8:samples=16,keep=lm_head+down_proj"], None),  # down_proj in bf16: passes the 8-bit gate
    # Q4_1's own layout (asymmetric, groups of 32; 128 does not divide SmolLM2's 576 anyway)
    "w4a16": (["w4a16:group_size=32,symmetric=false,samples=64"], None),
}

# Rows whose vLLM speed is measured: the others are, to vLLM, dense checkpoints of the teacher's
# shape (weights on a grid, or zeros), as fast as the baseline by construction; `pruned` has the
# student's shape but its bf16 artifact is refused by the build's gate (docs/compression.md).
# Every vLLM row's server runs at once (~3.5 GB each on the CPU build), so the list stays short.
VLLM_ROWS = ("baseline", "w8a8", "w4a16", "pruned+distilled")

_THROUGHPUT = r"""
import importlib.util, json, re, sys, time
path, streams, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = importlib.util.spec_from_file_location("shipped", f"{path}/model.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
lm = mod.CausalLM(path)
prompts = ["The capital of France is", "def add(a, b):", "Once upon a time", "Water boils at"]
def run(n):
    seqs = [mod.Sequence(prompt_ids=lm.encode(prompts[i % 4]), max_tokens=tokens) for i in range(n)]
    start = time.monotonic(); lm.generate(seqs)
    return sum(len(s.output_ids) for s in seqs), time.monotonic() - start
run(2)  # warm-up
made, seconds = run(streams)
print(json.dumps({"tokens": made, "seconds": seconds,
                  "peak_rss_mb": int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024}))
"""


# MiniLM (a sentence encoder): the compress methods are for causal LMs; what applies is the build's
# weight quantization of its MatMuls. Rows are build variants, judged by the build's cosine gate.
MINILM_VARIANTS = ("fp32", "int8", "w8", "w4")

_EMBED_THROUGHPUT = r"""
import importlib.util, json, re, sys, time
path, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = importlib.util.spec_from_file_location("shipped", f"{path}/model.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
embedder = mod.Embedder(path)
from pydoc_data.topics import topics
texts = [t[:400] for t in topics.values()][:batch]
embedder.embed(texts)  # warm-up
start = time.monotonic()
for _ in range(rounds):
    embedder.embed(texts)
seconds = time.monotonic() - start
print(json.dumps({"sentences": batch * rounds, "seconds": seconds,
                  "peak_rss_mb": int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024}))
"""


def minilm_row(variant: str, work: Path, batch: int) -> dict:
    """One MiniLM build variant: the build's cosine gate, ONNX size, sentences/s at batch `batch`
    (texts of up to 400 characters of the Python reference) and peak memory, in a child process."""
    from llmserve.artifacts import testmodels
    from llmserve.artifacts.build import BuildError, BuildRequest, build

    row = {"row": f"minilm-{variant}", "variant": variant}
    try:
        built = build(BuildRequest(source=testmodels.minilm(), repo=work / "repo",
                                   model=f"minilm-{variant}", kind="embedding", variant=variant))
    except BuildError as exc:
        return row | {"refused": str(exc)}
    row |= {"onnx_bytes": _dir_bytes(built.path, "model.onnx*"), "build_accuracy": built.accuracy}
    done = subprocess.run([sys.executable, "-c", _EMBED_THROUGHPUT, str(built.path), str(batch), "8"],
                          capture_output=True, text=True, check=True)
    speed = json.loads(done.stdout.strip().splitlines()[-1])
    return row | {"engine_onnx": speed | {"sentences_per_s": speed["sentences"] / speed["seconds"]}}


def minilm_table(rows: list[dict]) -> str:
    lines = [f"{'row':14} {'mean cos':>8} {'min cos':>8} {'gate':>7} {'ONNX MB':>8} {'sent/s':>7} {'peak MB':>8}"]
    for r in rows:
        acc, eng = r.get("build_accuracy") or {}, r.get("engine_onnx") or {}
        lines.append(f"{r['row']:14} {acc.get('mean_cosine', float('nan')):8.4f} "
                     f"{acc.get('min_cosine', float('nan')):8.4f} "
                     f"{'refused' if r.get('refused') else 'passed':>7} {r.get('onnx_bytes', 0) / 1e6:8.1f} "
                     f"{eng.get('sentences_per_s', float('nan')):7.1f} {eng.get('peak_rss_mb', float('nan')):8.0f}")
    return "\n".join(lines)


def peak_rss_mb() -> float:
    """This process's peak resident memory since its exec (VmHWM: getrusage's ru_maxrss would carry
    the forking parent's peak across exec, and the parent built the ONNX models)."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def _dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def throughput(version_dir: Path, streams: int, tokens: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _THROUGHPUT, str(version_dir), str(streams),
                           str(tokens)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"tokens_per_s": result["tokens"] / result["seconds"]}


def compress_child(source: Path, out: Path, methods: list[str]) -> dict:
    """One row's compression (run in a child process, so its peak memory is its own): the gate's
    record, and the model in `out` even when the gate refused it (for the speed columns), with
    the record as `out/ROW_FILE` (a later run with the same `--work` reuses both)."""
    from llmserve.compress.pipeline import CompressError, CompressRequest, compress

    start, row = time.monotonic(), {}
    try:
        row["gate"] = compress(CompressRequest(source=source, out=out, methods=methods))["gate"]
    except CompressError as exc:
        row |= {"gate": exc.gate, "refused": str(exc)}
        if exc.refused is not None:
            model, tokenizer = exc.refused
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    row |= {"methods": methods, "compress_s": time.monotonic() - start,
            "compress_peak_rss_mb": peak_rss_mb()}
    if (out / "config.json").is_file():
        (out / ROW_FILE).write_text(json.dumps(row, indent=2))
    return row


def _serve_vllm(stack: ExitStack, dataplane, model_dir: Path, name: str, work: Path, opts) -> tuple[str, str]:
    """Start vLLM's CPU build on `model_dir` (its OpenAI server, bench/dataplane.py's engine
    arguments); returns its URL and the artifact's variant. A model whose bf16 artifact the
    build's own gate refuses (a badly pruned model's flat distributions flip near-ties under
    bf16) is served as fp32, and the row says so."""
    from llmserve.artifacts.build import BuildError

    for variant in ("bf16", "fp32"):
        try:
            url = stack.enter_context(dataplane.serve("vllm", model_dir, name, work / variant,
                                                      argparse.Namespace(**vars(opts), vllm_variant=variant)))
            return url, variant
        except BuildError as exc:
            print(f"[bench] {name}: the {variant} vLLM artifact was refused: {exc}", file=sys.stderr, flush=True)
    raise RuntimeError(f"{name}: no vLLM artifact passed the build's gate")


def vllm_throughputs(models: dict[str, Path], work: Path, args) -> dict[str, dict]:
    """Output tokens/s of vLLM's CPU build for every row at once: all rows' servers start first,
    then `--rounds` rounds of `--streams` short-prompt streams (2 requests each) in which the
    rows take turns (order rotated), so load from elsewhere on the shared machine falls on every
    row alike; each row reports the median of its rounds."""
    sys.path.insert(0, str(Path(__file__).parent))
    import dataplane

    opts = argparse.Namespace(engine_args={}, mixes=["short"], streams=[args.streams],
                              requests_per_stream=2, max_tokens=args.tokens)
    rounds: dict[str, list[dict]] = {name: [] for name in models}
    with ExitStack() as stack:
        served = {}
        for name, model_dir in models.items():
            served[name] = _serve_vllm(stack, dataplane, model_dir, name.replace("+", "-"), work / name, opts)
            dataplane.measure_level(served[name][0], name.replace("+", "-"), "short", 2, opts)  # warm-up
        names = list(models)
        for turn in range(args.rounds):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                row = dataplane.measure_level(served[name][0], name.replace("+", "-"), "short", args.streams, opts)
                rounds[name].append(row)
                print(f"[bench] vLLM round {turn + 1} {name}: {row}", file=sys.stderr, flush=True)
    return {name: dataplane.median_rounds(rows) | {"vllm_variant": served[name][1]} for name, rows in rounds.items()}


def bench_row(name: str, source: Path, work: Path, args) -> dict:
    from llmserve.artifacts.build import BuildRequest, build

    methods, variant = ROWS[name]
    methods = [m.format(drop=args.drop, steps=args.steps, distill=args.distill) for m in methods]
    row = {"row": name, "methods": methods, "variant": variant}
    model_dir = source
    if methods:
        model_dir = work / name
        saved = model_dir / ROW_FILE
        if saved.is_file() and json.loads(saved.read_text())["methods"] == methods:
            print(f"[bench] {name}: reusing the compressed model in {model_dir}", file=sys.stderr, flush=True)
            row |= json.loads(saved.read_text()) | {"reused": str(model_dir)}
        else:
            done = subprocess.run([sys.executable, __file__, "--compress-child", str(source), str(model_dir),
                                   *methods], stdout=subprocess.PIPE, text=True, check=True)
            row |= json.loads(done.stdout.strip().splitlines()[-1])
    if args.gate_only or not (model_dir / "config.json").is_file():
        return row
    row["hf_weight_bytes"] = _dir_bytes(model_dir, "*.safetensors")
    row["model_dir"] = str(model_dir)
    model_name = name.replace("+", "-")
    if "onnx" in args.engines and variant:
        built = build(BuildRequest(source=model_dir, repo=work / "repo", model=model_name,
                                   kind="generate", variant=variant))
        row["onnx_bytes"] = _dir_bytes(built.path, "model.onnx*")
        row["build_accuracy"] = built.accuracy
        row["engine_onnx"] = throughput(built.path, args.streams, args.tokens)
    return row


def gap_closed(teacher_ppl: float, pruned_ppl: float, distilled_ppl: float) -> float:
    """The share of pruning's perplexity gap over the teacher that distillation closed
    (1: back to the teacher's perplexity, 0: no better than pruning alone)."""
    return (pruned_ppl - distilled_ppl) / (pruned_ppl - teacher_ppl)


def ratios(rows: list[dict]) -> list[str]:
    """vLLM tokens/s of each row over the teacher's, and the perplexity gap distillation closed."""
    by_name = {r["row"]: r for r in rows}
    lines = []
    teacher = (by_name.get("baseline") or {}).get("engine_vllm", {}).get("tokens_per_s")
    for r in rows:
        tps = r.get("engine_vllm", {}).get("tokens_per_s")
        if teacher and tps and r["row"] != "baseline":
            lines.append(f"{r['row']}: {tps / teacher:.2f}x the teacher's vLLM tokens/s")
    pruned = ((by_name.get("pruned") or {}).get("gate") or {}).get("metrics")
    distilled = ((by_name.get("pruned+distilled") or {}).get("gate") or {}).get("metrics")
    if pruned and distilled:
        closed = gap_closed(pruned["teacher_ppl"], pruned["candidate_ppl"], distilled["candidate_ppl"])
        lines.append(f"perplexity gap closed by distillation: {closed:.2f} (teacher "
                     f"{pruned['teacher_ppl']:.2f}, pruned {pruned['candidate_ppl']:.2f}, "
                     f"pruned+distilled {distilled['candidate_ppl']:.2f})")
    return lines


def table(rows: list[dict], source_note: str) -> str:
    lines = [f"source: {source_note}",
             f"{'row':18} {'KL':>7} {'ppl +%':>7} {'conf.agr':>8} {'gate':>7} {'HF MB':>7} "
             f"{'ONNX MB':>8} {'tok/s':>7} {'peak MB':>8} {'vLLM t/s':>8} {'cmp MB':>7}"]
    for r in rows:
        m = (r.get("gate") or {}).get("metrics") or {}
        eng = r.get("engine_onnx") or {}
        verdict = "-" if not m else ("refused" if r.get("refused") else "passed")
        lines.append(
            f"{r['row']:18} {m.get('mean_kl', float('nan')):7.4f} "
            f"{100 * m.get('ppl_increase', float('nan')):7.2f} "
            f"{m.get('confident_agreement', float('nan')):8.4f} {verdict:>7} "
            f"{r.get('hf_weight_bytes', 0) / 1e6:7.1f} {r.get('onnx_bytes', 0) / 1e6:8.1f} "
            f"{eng.get('tokens_per_s', float('nan')):7.1f} {eng.get('peak_rss_mb', float('nan')):8.0f} "
            f"{r.get('engine_vllm', {}).get('tokens_per_s', float('nan')):8.1f} "
            f"{r.get('compress_peak_rss_mb', float('nan')):7.0f}")
    return "\n".join(lines + ratios(rows))


def main() -> int:
    if len(sys.argv) > 3 and sys.argv[1] == "--compress-child":
        print(json.dumps(compress_child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="HF causal LM directory (default: SmolLM2)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="vLLM speed rounds, the rows taking turns; medians")
    parser.add_argument("--drop", type=int, default=12, help="layers dropped by the pruned rows")
    parser.add_argument("--steps", type=int, default=12, help="distillation steps (12 fit ~20 min "
                        "on the shared 2-core machine; more steps close more of the gap)")
    parser.add_argument("--distill", default="batch=4,seq_len=128,lr=5e-4",
                        help="further distill parameters of the pruned+distilled row")
    parser.add_argument("--engines", type=lambda s: s.split(","), default=["onnx"],
                        help="engines whose tokens/s to measure: onnx, vllm (comma-separated)")
    parser.add_argument("--gate-only", action="store_true", help="compress and gate; no builds")
    parser.add_argument("--minilm", default="", help="also MiniLM's build variants (comma-separated: "
                        f"{', '.join(MINILM_VARIANTS)}; 'all' for every one)")
    parser.add_argument("--batch", type=int, default=16, help="MiniLM sentences per request")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, help="keep the compressed models here (default: a "
                        "temporary directory); a row already compressed there the same way is reused")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}")
    minilm = list(MINILM_VARIANTS) if args.minilm == "all" else [v for v in args.minilm.split(",") if v]
    if set(minilm) - set(MINILM_VARIANTS):
        parser.error(f"unknown MiniLM variants {sorted(set(minilm) - set(MINILM_VARIANTS))}")
    if args.source:
        source, note = args.source.resolve(), str(args.source)
    else:
        from llmserve.artifacts import testmodels

        source = testmodels.smollm2()
        note = ("SmolLM2-135M-Instruct, de-quantized from a Q4_1 GGUF: its weights already sit on "
                "an asymmetric 4-bit grid of blocks of 32, which flatters the int4 row")
    results, minilm_results = [], []
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        def save():
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"source": note, "streams": args.streams, "tokens": args.tokens,
                                            "rounds": args.rounds, "rows": results,
                                            "minilm_batch": args.batch, "minilm": minilm_results}, indent=2))
            if results:
                print(table(results, note), flush=True)
            if minilm_results:
                print(minilm_table(minilm_results), flush=True)

        for variant in minilm:
            print(f"[bench] minilm {variant} ...", file=sys.stderr, flush=True)
            minilm_results.append(minilm_row(variant, work, args.batch))
            save()

        for name in rows:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            results.append(bench_row(name, source, work, args))
            save()
        if "vllm" in args.engines and not args.gate_only:
            models = {r["row"]: Path(r["model_dir"]) for r in results if "model_dir" in r and r["row"] in VLLM_ROWS}
            speeds = vllm_throughputs(models, work / "vllm", args)
            for r in results:
                if r["row"] in speeds:
                    r["engine_vllm"] = speeds[r["row"]]
            save()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
