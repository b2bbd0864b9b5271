"""`llmserve build --engine vllm`: Hugging Face model directory -> gated, immutable version that
Triton serves with vLLM (model_repo/vllm).

Stages: inspect the source -> load it in fp32 PyTorch (the reference) -> save the weights in the
variant's dtype as safetensors with the tokenizer, generation config and chat template -> add
`engine.json` (the version's default vLLM engine arguments), the shipped model.py and its
config.pbtxt -> accuracy gate: vLLM itself (in the vLLM engine environment, a subprocess running
`vllm_gate.py`) against PyTorch, teacher-forced next tokens and greedy continuations -> manifest
-> atomic publish.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmserve.compress import gate as compress_gate
from llmserve.compress import lineage
from llmserve.compress.oneshot import quantization_format
from llmserve.environments import env_python

from . import gate as gates
from .build import BuildError, BuildRequest, BuildResult, _Stage, detect_kind, progress, source_sha256, tool_versions
from .manifest import VERSION_CONFIG, write_manifest
from .repository import SHIPPED_REPO, check_model_name, check_version_free, publish, staging_dir

VLLM_VARIANTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENGINE_FILE = "engine.json"
GATE_SCRIPT = Path(__file__).with_name("vllm_gate.py")
GATE_NEW_TOKENS = 24
# The gate on a CPU-only vLLM: eager mode starts in seconds (compiled mode takes minutes), a KV
# budget in bytes instead of a fraction of host memory, every core to the engine.
GATE_CPU_ENGINE_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}


def shipped_vllm_files() -> tuple[Path, Path]:
    """model_repo/vllm's model.py and config.pbtxt, copied into every version."""
    model_dir = SHIPPED_REPO / "vllm"
    return model_dir / "1" / "model.py", model_dir / VERSION_CONFIG


def default_engine_args(config, variant: str) -> dict:
    """vLLM engine arguments a version starts with; the LLMService's settings override them."""
    return {
        "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[variant],
        "max_model_len": int(getattr(config, "max_position_embeddings", 2048)),
        "enable_prefix_caching": True,
        "enable_chunked_prefill": True,
        "gpu_memory_utilization": 0.9,
        "enforce_eager": False,
    }


def render_vllm_config(template: str, name: str, parameters: dict[str, str]) -> str:
    """The shipped config.pbtxt for model `name`, plus extra parameters (e.g. EXECUTION_ENV_PATH)."""
    text = re.sub(r'^name: "[^"]*"', f'name: "{name}"', template, count=1, flags=re.M)
    for key in sorted(parameters):
        text += f'parameters {{ key: "{key}" value: {{ string_value: "{parameters[key]}" }} }}\n'
    return text


def engine_python() -> Path:
    """The vLLM engine environment's interpreter (LLMSERVE_VLLM_PYTHON, else the default)."""
    python = env_python("vllm", "LLMSERVE_VLLM_PYTHON")
    if not python.exists():
        raise BuildError(f"no vLLM engine environment at {python}: run hack/setup.sh "
                         "(or `llmserve testbed engine-env vllm`), or set LLMSERVE_VLLM_PYTHON")
    return python


def run_vllm_gate(staged: Path, teacher_forced: list[list[int]], greedy: list[list[int]]) -> dict:
    """Ask vLLM (a subprocess in the engine environment) for next tokens and greedy continuations."""
    with tempfile.TemporaryDirectory(prefix="llmserve-vllm-gate-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({
            "version_dir": str(staged), "teacher_forced": teacher_forced, "greedy": greedy,
            "max_new_tokens": GATE_NEW_TOKENS, "cpu_engine_args": GATE_CPU_ENGINE_ARGS,
        }))
        env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
               "PYTHONUTF8": "1"}
        log = Path(tmp) / "vllm.log"
        with open(log, "wb") as out:
            done = subprocess.run([str(engine_python()), str(GATE_SCRIPT), str(request), str(result)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        if done.returncode != 0 or not result.is_file():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise BuildError(f"vLLM could not run the staged version (exit {done.returncode}):\n{tail}")
        return json.loads(result.read_text())


def build_vllm(req: BuildRequest) -> BuildResult:
    if req.variant not in VLLM_VARIANTS:
        raise BuildError(f"variant {req.variant!r} is not available for the vllm engine "
                         f"(choose from {', '.join(VLLM_VARIANTS)}; vLLM quantizes at load time)")
    source = req.source = req.source.resolve()
    with _Stage(f"inspect {source}"):
        kind, config = detect_kind(source, req.kind)
        if kind != "generate":
            raise BuildError(f"{source}: the vllm engine serves causal LMs; build encoders with "
                             "--engine onnxruntime")
        name = check_model_name(req.model or source.name)
        check_version_free(req.repo, name, req.version)
        quantized = quantization_format(json.loads((source / "config.json").read_text()))
        if quantized and quantized["gpu_only"] and not torch.cuda.is_available():
            raise BuildError(f"{source}: its {quantized['scheme']} checkpoint is GPU-only "
                             f"({quantized['reason']}); the gate runs vLLM on this machine, which has "
                             "no GPU: build it where one is, or compress with w8a8 or w4a16 for CPUs")
        digest = source_sha256(source)
    checkpoint = f", {quantized['scheme']} checkpoint ({quantized['reason']})" if quantized else ""
    progress(f"causal LM {name!r} for vLLM, variant {req.variant}{checkpoint}, "
             f"source sha256 {digest[:16]}...")
    model_code, config_template = shipped_vllm_files()
    staged = staging_dir(req.repo, name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if quantized:
            model = None  # the reference runs in the compression environment (see _gate)
            with _Stage("copy the compressed-tensors checkpoint as is (vLLM reads its quantization_config)"):
                for path in source.iterdir():
                    if path.is_file():
                        shutil.copyfile(path, staged / path.name)
        else:
            with _Stage("load the PyTorch reference"):
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        with _Stage(f"save Hugging Face files ({req.variant} safetensors, tokenizer, chat template)"):
            if not quantized:
                served = model if req.variant == "fp32" else AutoModelForCausalLM.from_pretrained(
                    source, dtype=VLLM_VARIANTS[req.variant])
                served.save_pretrained(staged, safe_serialization=True)
                del served
                tokenizer.save_pretrained(staged)
            shutil.copyfile(model_code, staged / "model.py")
            for path in staged.iterdir():  # safetensors are written 0600; the pod's user must read them
                path.chmod(0o644)
            engine_args = default_engine_args(config, req.variant)
            (staged / ENGINE_FILE).write_text(json.dumps(engine_args, indent=2, sort_keys=True) + "\n")
        metrics = _gate(req, model, tokenizer, staged, source, activations=bool(quantized and quantized["activations"]))
        failures = req.thresholds.check(metrics)
        accuracy = {**metrics, "thresholds": asdict(req.thresholds), "passed": not failures}
        progress("accuracy: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in metrics.items()))
        if failures:
            raise BuildError(f"accuracy gate failed for the {req.variant} vLLM artifact: "
                             f"{'; '.join(failures)}; nothing was published")
        (staged / VERSION_CONFIG).write_text(
            render_vllm_config(config_template.read_text(), name, req.serving.parameters))
        manifest_sha = write_manifest(staged, {
            "model": name, "kind": "generate", "engine": "vllm", "variant": req.variant,
            "lineage": lineage.read(source),  # compression history (llmserve compress), or None
            "source": {"path": str(source), "sha256": digest,
                       "architectures": list(config.architectures or [])},
            "accuracy": accuracy, "engine_args": engine_args, "tools": tool_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        with _Stage("publish"):
            version = publish(staged, req.repo, name, req.version)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    path = req.repo / name / str(version)
    progress(f"published {path} (manifest sha256 {manifest_sha})")
    return BuildResult(name, version, path, manifest_sha, accuracy)


def _gate(req: BuildRequest, model, tokenizer, staged: Path, source: Path, *, activations: bool) -> dict:
    """vLLM's next tokens and greedy continuations against the PyTorch reference: `model`, or for
    a compressed-tensors checkpoint (`model` None) the checkpoint de-compressed by
    compressed-tensors in the compression environment.

    A checkpoint that quantizes `activations` (W8A8) is judged at the positions where the
    reference is confident only: the de-compressed reference keeps activations in float, so where
    two tokens are nearly tied vLLM's int8 activations flip the argmax by construction (SmolLM2
    W8A8: 0.96 over all 156 positions). The share over all positions is reported beside it. Its
    quality against the original model is what `llmserve compress`'s gate measured."""
    texts = req.eval_texts or gates.LM_TEXTS
    prompts = gates.LM_PROMPTS if req.eval_texts is None else [t[:64] for t in texts]
    teacher_forced = [tokenizer(t)["input_ids"][:256] for t in texts]
    greedy_prompts = [tokenizer(p)["input_ids"] for p in prompts]
    with _Stage(f"accuracy gate: vLLM on the staged version ({len(texts)} texts, "
                f"{len(prompts)} prompts x {GATE_NEW_TOKENS} tokens)"):
        served = run_vllm_gate(staged, teacher_forced, greedy_prompts)
    generation = model.generation_config if model is not None else _generation_config(source)
    eos = generation.eos_token_id
    eos_ids = sorted({*([eos] if isinstance(eos, int) else eos or []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    if model is None:
        with _Stage("accuracy gate: PyTorch reference (compressed-tensors, compression environment)"):
            reference = _compressed_reference(source, teacher_forced, greedy_prompts, eos_ids)
        reference_next = [np.array(ids) for ids in reference["next_tokens"]]
        reference_top1 = [np.array(p) for p in reference["confidence"]]
        reference_greedy = reference["greedy"]
    else:
        reference_next, reference_greedy = _torch_reference(model, teacher_forced, greedy_prompts, eos_ids)
    candidate_next = [np.array(ids) for ids in served["next_tokens"]]
    candidate_greedy = [[t for t in ids if t not in eos_ids] for ids in served["greedy"]]
    metrics = {**gates.next_token_agreement(reference_next, candidate_next),
               **gates.greedy_agreement(reference_greedy, candidate_greedy)}
    if activations:
        metrics["next_token_agreement_all_positions"] = metrics.pop("next_token_agreement")
        metrics.update(gates.confident_next_token_agreement(reference_next, candidate_next, reference_top1,
                                                            compress_gate.CONFIDENT))
    return metrics


def _generation_config(source: Path):
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))


def _compressed_reference(source: Path, teacher_forced, greedy_prompts, eos_ids) -> dict:
    from llmserve.compress import oneshot

    with tempfile.TemporaryDirectory(prefix="llmserve-ct-reference-") as tmp:
        result = Path(tmp) / "result.json"
        try:
            oneshot.run_job({"mode": "reference", "model_dir": str(source), "result": str(result),
                             "teacher_forced": teacher_forced, "greedy": greedy_prompts,
                             "max_new_tokens": GATE_NEW_TOKENS, "eos_ids": eos_ids},
                            Path(tmp), progress)
        except oneshot.OneshotError as exc:
            raise BuildError(f"the compressed-tensors reference failed: {exc}") from None
        return json.loads(result.read_text())


def _torch_reference(model, teacher_forced, greedy_prompts, eos_ids):
    with _Stage("accuracy gate: PyTorch reference"), torch.no_grad():
        reference_next = [model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).numpy()
                          for ids in teacher_forced]
        reference_greedy = []
        for ids in greedy_prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=GATE_NEW_TOKENS, do_sample=False,
                                 eos_token_id=eos_ids or None, pad_token_id=(eos_ids or [0])[0])
            reference_greedy.append([t for t in out[0, len(ids):].tolist() if t not in eos_ids])
    return reference_next, reference_greedy
