"""`llmserve build`: Hugging Face model directory -> gated, immutable Triton model version.

Stages: inspect the source -> load it in fp32 PyTorch -> export to ONNX with `torch.onnx.export`
(causal LMs with KV-cache inputs and outputs) -> ONNX Runtime transformer graph optimization ->
variant (fp32, fp16, or int8 dynamic per-channel quantization) -> assemble the version in a
staging directory (shipped model.py, tokenizer, artifact.json, config.pbtxt) -> accuracy gate,
run through the staged model.py exactly as Triton will run it -> manifest -> atomic publish.

This module imports torch and transformers at import time; the CLI imports it only inside the
build command so `verify` and `pull` stay light.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import platform
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from llmserve.compress import lineage, onnx_quant

from . import gate as gates
from .manifest import VERSION_CONFIG, write_manifest
from .repository import (
    KINDS,
    ServingConfig,
    check_model_name,
    check_version_free,
    publish,
    render_config,
    shipped_model_code,
    staging_dir,
)

VARIANTS = ("fp32", "fp16", "int8", "w8", "w4")  # w8/w4: weight-only MatMulNBits
ONNX_FILE = "model.onnx"
OPSET = 18
_TWO_GB = 2 << 30
# Files the python-backend models read; copied from the tokenizer's save_pretrained output.
TOKENIZER_FILES = ("tokenizer.json",)


class BuildError(Exception):
    """The source cannot be built or the artifact failed the gate; nothing was published."""


@dataclass
class BuildRequest:
    source: Path
    repo: Path
    model: str | None = None
    kind: str = "auto"
    variant: str = "fp32"
    version: int | None = None
    serving: ServingConfig = field(default_factory=ServingConfig)
    thresholds: gates.Thresholds = field(default_factory=gates.Thresholds)
    eval_texts: list[str] | None = None
    max_length: int | None = None  # embedding truncation; default from the source model
    engine: str = "onnxruntime"  # or "vllm": Hugging Face files served by vLLM (vllm_build.py)


@dataclass
class BuildResult:
    model: str
    version: int
    path: Path
    manifest_sha256: str
    accuracy: dict


def progress(message: str) -> None:
    print(f"[build] {message}", file=sys.stderr, flush=True)


class _Stage:
    """Prints a stage on entry and its duration on exit."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.start = time.monotonic()
        progress(f"{self.name} ...")

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            progress(f"{self.name} done ({time.monotonic() - self.start:.1f}s)")


# -- source ------------------------------------------------------------------------------------


def detect_kind(source: Path, requested: str) -> tuple[str, transformers.PretrainedConfig]:
    if not source.is_dir():
        raise BuildError(f"{source}: no such model directory")
    if not (source / "config.json").is_file():
        raise BuildError(
            f"{source}: not a Hugging Face model directory (no config.json); "
            "save the model with save_pretrained() first"
        )
    try:
        config = AutoConfig.from_pretrained(source)
    except (ValueError, KeyError, OSError) as exc:
        raise BuildError(f"{source}: unsupported model configuration: {exc}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise BuildError(f"{source}: encoder-decoder models are not supported")
    architectures = config.architectures or []
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    kind = requested if requested != "auto" else ("generate" if causal else "embedding")
    if kind not in KINDS:
        raise BuildError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    if kind == "generate" and not causal:
        raise BuildError(f"{source}: {architectures or config.model_type} is not a causal LM")
    return kind, config


def source_sha256(source: Path) -> str:
    """One digest over every file's path and content: the identity of what was built."""
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        digest.update(rel.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("llmserve", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


# -- export wrappers: the exact function the artifact computes, also the gate's reference --------


class EncoderForEmbedding(torch.nn.Module):
    """Encoder + (mean | CLS) pooling + optional L2 normalization, as sentence-transformers does."""

    def __init__(self, encoder, pooling: str, normalize: bool):
        super().__init__()
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled


class CausalLMWithCache(torch.nn.Module):
    """A causal LM step with explicit KV-cache tensors in and out.

    `logit_index` [B, K] selects the positions whose logits are returned: the last one while
    serving (a [B, S, vocab] prefill output would be large), every position in the gate.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, logit_index, *past):
        cache = transformers.DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state
        picked = torch.gather(hidden, 1, logit_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (self.model.lm_head(picked), *present)


def _sentence_transformers_pooling(source: Path) -> tuple[str, bool]:
    """Pooling mode and normalization from a sentence-transformers layout (default: mean, L2)."""
    pooling, normalize = "mean", True
    modules = source / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        normalize = any(e.get("type", "").endswith("Normalize") for e in entries)
        for entry in entries:
            cfg = source / entry.get("path", "") / "config.json"
            if entry.get("type", "").endswith("Pooling") and cfg.is_file():
                if json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
                    pooling = "cls"
    return pooling, normalize


def _max_length(source: Path, tokenizer, config, requested: int | None) -> int:
    if requested:
        return requested
    st_config = source / "sentence_bert_config.json"
    if st_config.is_file():
        return int(json.loads(st_config.read_text()).get("max_seq_length", 512))
    limit = getattr(config, "max_position_embeddings", 512)
    return int(min(tokenizer.model_max_length or limit, limit))


# -- ONNX ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
           path: Path, *, dynamic_shapes=None, dynamic_axes=None) -> None:
    """`torch.onnx.export` with the dynamo exporter (`dynamic_shapes`), or with the TorchScript
    exporter (`dynamic_axes`): ONNX Runtime's BERT fusions match the TorchScript graph of an
    encoder (MiniLM: 6 fused Attention nodes) but none of the dynamo graph's, while causal LMs
    with a DynamicCache export cleanly only through dynamo."""
    # The exporter's notes on axis naming and absent torchvision ops are about its internals, not
    # about this model: keep the build's progress output readable.
    with torch.no_grad(), warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore", UserWarning)
        if dynamic_axes is not None:
            torch.onnx.export(module, args, str(path), input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes,
                              dynamo=False, opset_version=OPSET)
            return
        program = torch.onnx.export(
            module, args, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=OPSET, verbose=False,
        )
    program.save(str(path), external_data=program.model_proto.ByteSize() > _TWO_GB)


def optimize(raw: Path, out: Path, kind: str, config) -> dict:
    """ONNX Runtime's transformer fusions (attention, layer norm, GELU, ...). Returns the counts
    of fused operators, which the manifest records."""
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(
        str(raw), model_type="bert" if kind == "embedding" else "gpt2",
        num_heads=config.num_attention_heads, hidden_size=config.hidden_size,
    )
    model.save_model_to_file(str(out), use_external_data_format=model.model.ByteSize() > _TWO_GB)
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def make_variant(optimized: Path, out: Path, variant: str, config=None,
                 source_lineage: dict | None = None) -> None:
    if variant == "fp32":
        shutil.move(optimized, out)
    elif variant == "fp16":
        from onnxruntime.transformers.onnx_model import OnnxModel

        model = OnnxModel(onnx.load(str(optimized)))
        # Inputs and outputs stay fp32 so clients and the KV-cache plumbing do not change.
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(out), use_external_data_format=model.model.ByteSize() > _TWO_GB)
    elif variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Per-channel: one scale per output channel. Per-tensor scales let a few large weights
        # crush the rest (MiniLM's worst-case cosine drops to 0.87 with them).
        quantize_dynamic(str(optimized), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    elif variant in onnx_quant.VARIANT_BITS:
        try:
            spec = onnx_quant.scheme(variant, source_lineage)
            done = onnx_quant.quantize(optimized, out, spec, config.vocab_size)
        except onnx_quant.QuantizeError as exc:
            raise BuildError(f"variant {variant}: {exc}") from None
        progress(f"weight-only int{spec['bits']}: {done['matmulnbits_nodes']} MatMulNBits "
                 f"(block {spec['block_size']}, {'symmetric' if spec['symmetric'] else 'asymmetric'}"
                 f"), {done['kept_full_precision']} MatMul kept full precision")
    else:
        raise BuildError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")


def _load_shipped(path: Path, kind: str):
    spec = importlib.util.spec_from_file_location(f"llmserve_shipped_{kind}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- per kind: export, artifact.json, gate --------------------------------------------------------


def _load_source(req: BuildRequest, model_class) -> tuple:
    """The source's fast tokenizer (the shipped model.py reads tokenizer.json) and its fp32 model.
    Eager attention exports as plain MatMul/Softmax, which ORT's optimizer fuses into Attention."""
    tokenizer = AutoTokenizer.from_pretrained(req.source)
    if not tokenizer.is_fast:
        raise BuildError(f"{req.source}: needs a fast tokenizer (tokenizer.json)")
    model = model_class.from_pretrained(req.source, attn_implementation="eager", dtype=torch.float32)
    return tokenizer, model.eval()


def _build_embedding(req: BuildRequest, config, staged: Path, work: Path) -> tuple[dict, dict, dict]:
    tokenizer, encoder = _load_source(req, AutoModel)
    pooling, normalize = _sentence_transformers_pooling(req.source)
    wrapper = EncoderForEmbedding(encoder, pooling, normalize).eval()
    max_length = _max_length(req.source, tokenizer, config, req.max_length)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in tokenizer.model_input_names]
    example = tokenizer(["an example", "a longer example sentence"], padding=True,
                        return_tensors="pt")
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"sentence_embedding": {0: "batch"}}
    with _Stage("export to ONNX"):
        export(wrapper, tuple(example[n] for n in names), names, ["sentence_embedding"],
               work / "raw.onnx", dynamic_axes=axes)
    fused = _optimize_and_vary(req, config, work, staged)
    meta = {
        "kind": "embedding", "onnx": ONNX_FILE, "max_length": max_length,
        "pad_token_id": tokenizer.pad_token_id or 0, "pooling": pooling, "normalize": normalize,
        "embedding_dim": config.hidden_size,
    }
    _write_runtime_files(staged, tokenizer, meta)

    texts = req.eval_texts or gates.EMBEDDING_TEXTS
    with _Stage(f"accuracy gate ({len(texts)} texts)"):
        with torch.no_grad():
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            reference = wrapper(**{n: enc[n] for n in names}).numpy()
        embedder = _load_shipped(staged / "model.py", "embedding").Embedder(staged)
        candidate, _ = embedder.embed(texts)
        metrics = gates.cosine_metrics(reference, candidate)
    params = {"embedding_dim": str(config.hidden_size), "max_length": str(max_length)}
    return metrics, params, {"fused_operators": fused}


def _build_generate(req: BuildRequest, config, staged: Path, work: Path) -> tuple[dict, dict, dict]:
    tokenizer, model = _load_source(req, AutoModelForCausalLM)
    wrapper = CausalLMWithCache(model).eval()
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past_names = [f"past_key_values.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    present_names = [f"present.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    b, s, p = 2, 3, 4  # example sizes > 1 so that export keeps every axis dynamic
    example = (
        torch.randint(0, config.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
        torch.arange(p, p + s).expand(b, s), torch.full((b, 1), s - 1),
        *[torch.zeros(b, kv_heads, p, head_dim) for _ in past_names],
    )
    batch, seq, past, total, picked = (torch.export.Dim(n) for n in
                                       ("batch", "sequence", "past", "total", "picked"))
    dynamic = {
        "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq}, "logit_index": {0: batch, 1: picked},
        "past": tuple({0: batch, 2: past} for _ in past_names),
    }
    with _Stage("export to ONNX (with KV cache)"):
        export(wrapper, example,
               ["input_ids", "attention_mask", "position_ids", "logit_index", *past_names],
               ["logits", *present_names], work / "raw.onnx", dynamic_shapes=dynamic)
    fused = _optimize_and_vary(req, config, work, staged)
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*([eos] if isinstance(eos, int) else eos or []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    context = int(getattr(config, "max_position_embeddings", 2048))
    meta = {
        "kind": "generate", "onnx": ONNX_FILE, "num_layers": layers, "num_kv_heads": kv_heads,
        "head_dim": head_dim, "past_dtype": "float32", "eos_token_ids": eos_ids,
        "context_length": context, "chat_template": template,
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
    }
    _write_runtime_files(staged, tokenizer, meta)

    texts = req.eval_texts or gates.LM_TEXTS
    shipped = _load_shipped(staged / "model.py", "generate")
    lm = shipped.CausalLM(staged)
    with _Stage(f"accuracy gate: teacher-forced next token ({len(texts)} texts)"):
        ref_argmax, cand_argmax = [], []
        for text in texts:
            ids = lm.encode(text)[:256]
            with torch.no_grad():
                ref_argmax.append(model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).numpy())
            n = len(ids)
            logits, _ = lm.forward(np.array([ids]), np.ones((1, n)), np.arange(n)[None],
                                   lm.empty_past(1), np.arange(n)[None])
            cand_argmax.append(logits[0].argmax(-1))
        metrics = gates.next_token_agreement(ref_argmax, cand_argmax)
    if req.thresholds.check(metrics):  # already refused: skip the slowest measurement
        progress("greedy generation skipped: the artifact already failed the gate")
        return metrics, {}, {"fused_operators": fused}
    prompts = gates.LM_PROMPTS if req.eval_texts is None else [t[:64] for t in texts]
    new_tokens = 24
    with _Stage(f"accuracy gate: greedy generation ({len(prompts)} prompts x {new_tokens} tokens)"):
        reference, seqs = [], []
        for prompt in prompts:
            ids = lm.encode(prompt)
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                     max_new_tokens=new_tokens, do_sample=False,
                                     eos_token_id=eos_ids, pad_token_id=eos_ids[0])
            reference.append([t for t in out[0, len(ids):].tolist() if t not in eos_ids])
            seqs.append(shipped.Sequence(prompt_ids=ids, max_tokens=new_tokens))
        lm.generate(seqs)  # batched, as the server runs concurrent requests
        metrics |= gates.greedy_agreement(reference, [s.output_ids for s in seqs])
    return metrics, {"context_length": str(context)}, {"fused_operators": fused}


def _optimize_and_vary(req: BuildRequest, config, work: Path, staged: Path) -> dict:
    with _Stage("ONNX Runtime graph optimization"):
        fused = optimize(work / "raw.onnx", work / "optimized.onnx", req.kind, config)
    progress(f"fused operators: {fused or 'none'}")
    with _Stage(f"variant {req.variant}"):
        make_variant(work / "optimized.onnx", work / ONNX_FILE, req.variant, config,
                     lineage.read(req.source))
    for path in work.glob(f"{ONNX_FILE}*"):  # the model and its external data, if any
        shutil.move(path, staged / path.name)
    return fused


def _write_runtime_files(staged: Path, tokenizer, meta: dict) -> None:
    tok_dir = staged.parent / f"{staged.name}-tokenizer"
    tokenizer.save_pretrained(tok_dir)
    try:
        for name in TOKENIZER_FILES:
            shutil.copyfile(tok_dir / name, staged / name)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    (staged / "artifact.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# -- the build -----------------------------------------------------------------------------------


def build(req: BuildRequest) -> BuildResult:
    if req.engine == "vllm":
        from .vllm_build import build_vllm

        return build_vllm(req)
    if req.variant not in VARIANTS:
        raise BuildError(f"unknown variant {req.variant!r} (choose from {', '.join(VARIANTS)})")
    source = req.source.resolve()
    req.source = source
    with _Stage(f"inspect {source}"):
        req.kind, config = detect_kind(source, req.kind)
        name = check_model_name(req.model or source.name)
        check_version_free(req.repo, name, req.version)
        digest = source_sha256(source)
    progress(f"{req.kind} model {name!r}, variant {req.variant}, source sha256 {digest[:16]}...")
    staged = staging_dir(req.repo, name)
    work = Path(str(staged) + "-work")
    work.mkdir()
    try:
        shutil.copyfile(shipped_model_code(req.kind), staged / "model.py")
        torch.manual_seed(0)
        builder = _build_embedding if req.kind == "embedding" else _build_generate
        metrics, params, onnx_info = builder(req, config, staged, work)
        failures = req.thresholds.check(metrics)
        accuracy = {**metrics, "thresholds": asdict(req.thresholds), "passed": not failures}
        progress("accuracy: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
        if failures:
            raise BuildError(
                f"accuracy gate failed for the {req.variant} artifact: {'; '.join(failures)}; "
                "nothing was published"
            )
        (staged / VERSION_CONFIG).write_text(render_config(name, req.kind, req.serving, params))
        manifest_sha = write_manifest(staged, {
            "model": name,
            "kind": req.kind,
            "variant": req.variant,
            "lineage": lineage.read(source),  # compression history (llmserve compress), or None
            "source": {"path": str(source), "sha256": digest,
                       "architectures": list(config.architectures or [])},
            "accuracy": accuracy,
            "onnx": {"opset": OPSET, **onnx_info},
            "serving": asdict(req.serving),
            "tools": tool_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        with _Stage("publish"):
            version = publish(staged, req.repo, name, req.version)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)
    path = req.repo / name / str(version)
    progress(f"published {path} (manifest sha256 {manifest_sha})")
    return BuildResult(name, version, path, manifest_sha, accuracy)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
