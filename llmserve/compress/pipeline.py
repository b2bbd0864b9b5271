"""`llmserve compress`: source HF directory -> methods -> gate against the original teacher ->
new HF directory with lineage. Nothing is written when a method does not fit or the gate refuses.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import corpus as corpora
from . import evaluate, gate, lineage
from .methods import METHODS, Context, MethodError, parse


class CompressError(Exception):
    """Printed as one line by the CLI; nothing was written. A gate refusal carries the gate's
    record (`gate`) and the refused model with its tokenizer (`refused`, in memory only), so a
    benchmark can still report what was measured and how fast the refused model would be."""

    def __init__(self, message: str, gate: dict | None = None, refused: tuple | None = None):
        super().__init__(message)
        self.gate = gate
        self.refused = refused


@dataclass
class CompressRequest:
    source: Path
    out: Path
    methods: list[str]  # "name:key=value,..."
    corpus: str = corpora.DEFAULT_CORPUS
    positions: int = gate.MIN_POSITIONS + 48  # 8 windows of 256
    teacher: Path | None = None  # where the original teacher now lives, if it moved
    # Teacher logits per held-out window, shared by runs against the same teacher (a benchmark
    # compressing one source several ways computes them once).
    teacher_logits: dict | None = None


def progress(message: str) -> None:
    print(f"[compress] {message}", file=sys.stderr, flush=True)


def _teacher_dir(req: CompressRequest, parent: dict | None, source_digest: str) -> tuple[Path, str]:
    from llmserve.artifacts.build import source_sha256

    if parent is None:
        return req.source, source_digest
    recorded = parent["teacher"]
    path = req.teacher or Path(recorded["path"])
    if not (path / "config.json").is_file():
        raise CompressError(f"the original teacher {recorded['path']} of {req.source} is not there; "
                            "pass --teacher DIR where it lives now")
    if source_sha256(path) != recorded["sha256"]:
        raise CompressError(f"{path} is not the original teacher of {req.source} "
                            f"(sha256 differs from the lineage's {recorded['sha256'][:16]}...)")
    return path, recorded["sha256"]


def _load(path: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CompressError(f"{path}: not a Hugging Face model directory: {exc}") from None
    if not any(a.endswith("ForCausalLM") for a in config.architectures or []):
        raise CompressError(f"{path}: {config.architectures or config.model_type} is not a causal "
                            "LM; compression methods here are for causal LMs")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def compress(req: CompressRequest) -> dict:
    import torch
    from transformers import AutoTokenizer

    from llmserve.artifacts.build import source_sha256

    if not req.methods:
        raise CompressError("give at least one --method")
    if req.out.exists():
        raise CompressError(f"{req.out} already exists; compressed models are never overwritten")
    if not (req.source / "config.json").is_file():
        raise CompressError(f"{req.source}: not a Hugging Face model directory (no config.json)")
    try:
        parsed = [parse(spec) for spec in req.methods]
        parent = lineage.read(req.source)
        thresholds = gate.family_of(lineage.method_names(parent) + [n for n, _ in parsed])
        check_oneshot_last([n for n, _ in parsed])
    except (MethodError, lineage.LineageError, ValueError) as exc:
        raise CompressError(str(exc)) from None
    if "quantization_config" in json.loads((req.source / "config.json").read_text()):
        raise CompressError(f"{req.source} is already quantized (quantization_config in config.json); "
                            "compress its unquantized source instead")
    if any(METHODS[n].oneshot for n, _ in parsed):
        from .oneshot import GPU_ONLY, OneshotError, compress_python

        for name in [n for n, _ in parsed if n in GPU_ONLY and not torch.cuda.is_available()]:
            raise CompressError(f"{name} is GPU-only: {GPU_ONLY[name]}; this machine has no GPU "
                                "(for vLLM's CPU build use w8a8 or w4a16)")
        try:
            compress_python()  # a missing environment is told before minutes of loading
        except OneshotError as exc:
            raise CompressError(str(exc)) from None
    progress(f"gate family {thresholds.family}: mean_kl <= {thresholds.max_mean_kl}, "
             f"ppl_increase <= {thresholds.max_ppl_increase}, "
             f"confident_agreement >= {thresholds.min_confident_agreement}")
    digest = source_sha256(req.source)
    teacher_dir, teacher_digest = _teacher_dir(req, parent, digest)
    torch.manual_seed(0)
    teacher = _load(teacher_dir)
    model = copy.deepcopy(teacher) if teacher_dir == req.source else _load(req.source)
    tokenizer = AutoTokenizer.from_pretrained(req.source)
    try:
        train_text, _ = corpora.split(req.corpus)
    except ValueError as exc:
        raise CompressError(str(exc)) from None
    ctx = Context(teacher=teacher, tokenizer=tokenizer, train_text=train_text, progress=progress)
    applied = []
    for name, params in parsed:
        if METHODS[name].oneshot:  # checked here, run after the in-process methods
            try:
                METHODS[name].run(model, params, ctx)
            except MethodError as exc:
                raise CompressError(str(exc)) from None
            continue
        start = time.monotonic()
        progress(f"{name} {params} ...")
        try:
            model = METHODS[name].run(model, params, ctx)
        except MethodError as exc:
            raise CompressError(str(exc)) from None
        progress(f"{name} done ({time.monotonic() - start:.1f}s)")
        applied.append({"name": name, "params": params})

    windows = evaluate.held_out_windows(tokenizer, req.corpus, req.positions)
    req.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{req.out.name}-", dir=req.out.parent))
    try:
        return _gate_and_write(req, model, tokenizer, ctx, parsed, applied, windows, tmp, parent,
                               thresholds, digest, teacher, teacher_dir, teacher_digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_oneshot_last(names: list[str]) -> None:
    """llmcompressor's methods write a quantized checkpoint nothing here can change further:
    at most one, and last in the chain."""
    oneshot_names = [n for n in names if METHODS[n].oneshot]
    if len(oneshot_names) > 1 or (oneshot_names and names[-1] != oneshot_names[0]):
        raise ValueError(f"{', '.join(oneshot_names)}: a compressed-tensors method must be the last "
                         "method of the chain, and only one")


def _run_oneshot(model, tokenizer, ctx: Context, name: str, params: dict,
                 windows: list[list[int]], tmp: Path) -> tuple[Path, evaluate.LogitsFn, dict]:
    """llmcompressor on the model so far, in the compression environment: the compressed
    directory, the gate candidate answering from its logits, and the job's tool versions."""
    from . import oneshot

    source, out, logits = tmp / "oneshot-input", tmp / "oneshot-output", tmp / "oneshot-logits"
    logits.mkdir()
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    calibration = ctx.calibration_batch(params["samples"], params["seq_len"]).tolist() \
        if name != "w8a8-fp8" else []
    start = time.monotonic()
    progress(f"{name}: llmcompressor in {oneshot.compress_python().parent.parent} "
             f"({len(calibration)} calibration sequences)")
    try:
        oneshot.run_job({"mode": "oneshot", "source": str(source), "out": str(out),
                         "logits_dir": str(logits), "calibration": calibration,
                         "gate_windows": windows, **oneshot.job_request(name, params)}, tmp, progress)
    except oneshot.OneshotError as exc:
        raise CompressError(str(exc)) from None
    progress(f"{name} done ({time.monotonic() - start:.1f}s)")
    shutil.rmtree(source)
    tools = json.loads((logits / "tools.json").read_text())
    return out, oneshot.window_logits(logits, windows), tools


def _gate_and_write(req, model, tokenizer, ctx, parsed, applied, windows, tmp, parent, thresholds,
                    digest, teacher, teacher_dir, teacher_digest) -> dict:
    from llmserve.artifacts.build import tool_versions

    name, params = parsed[-1]
    if METHODS[name].oneshot:
        written, candidate, job_tools = _run_oneshot(model, tokenizer, ctx, name, params, windows, tmp)
        applied.append({"name": name, "params": params})
    else:
        written, candidate, job_tools = None, evaluate.torch_logits(model), {}
    start = time.monotonic()
    teacher_fn = evaluate.torch_logits(teacher)
    if req.teacher_logits is not None:
        teacher_fn = evaluate.memoized(teacher_fn, req.teacher_logits, teacher_digest)
    metrics = evaluate.compare(teacher_fn, candidate, windows, progress)
    record = gate.verdict(metrics, thresholds)
    progress(f"gate ({time.monotonic() - start:.1f}s): " +
             ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items()))
    if not record["passed"]:
        raise CompressError(f"gate ({thresholds.family}) refused the compressed model: "
                            f"{'; '.join(record['failures'])}; nothing was written", record,
                            refused=(model, tokenizer) if written is None else None)

    result = lineage.extend(parent, {"path": str(req.source.resolve()), "sha256": digest},
                            applied)
    result["teacher"] = {"path": str(teacher_dir.resolve()), "sha256": teacher_digest}
    result |= {"gate": record | {"corpus": req.corpus}, "tools": tool_versions() | job_tools,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if written is None:
        written = tmp / "model"
        model.save_pretrained(written)
        tokenizer.save_pretrained(written)
    (written / lineage.LINEAGE_FILE).write_text(json.dumps(result, indent=2) + "\n")
    written.rename(req.out)
    progress(f"wrote {req.out} ({lineage.summary(result)})")
    return result
