"""The llmcompressor methods (w8a8, w4a16, w8a8-fp8, sparsegpt-2of4): its `oneshot` run in the
compression environment, a subprocess of `llmserve compress` (llmcompressor's torch and
transformers pins conflict with the build venv's; hack/engine-compress.txt).

The pipeline stays here: it saves the model so far as a Hugging Face directory, hands the job
(`oneshot_job.py`) calibration token ids from our corpus and the gate's held-out windows, and
gets back a compressed-tensors directory (vLLM serves it as is) plus the quantized model's
logits on those windows, which the gate compares with the teacher's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from llmserve.environments import env_python

JOB_SCRIPT = Path(__file__).with_name("oneshot_job.py")
SETUP_HINT = "hack/setup.sh (its compression-environment step: a venv from hack/engine-compress.txt)"
# The scheme each method writes (compressed-tensors names) and whether vLLM needs a GPU for it.
SCHEMES = {"w8a8": "W8A8", "w4a16": "W4A16", "w8a8-fp8": "FP8_DYNAMIC", "sparsegpt-2of4": "SPARSE_2_4"}
GPU_ONLY = {"w8a8-fp8": "FP8 weights and activations need a GPU with FP8 support (Ada/Hopper or newer)"}


class OneshotError(Exception):
    """The compression environment is missing or the job failed; the message says which."""


def compress_python() -> Path:
    """The compression environment's interpreter (LLMSERVE_COMPRESS_PYTHON, else the default)."""
    python = env_python("compress", "LLMSERVE_COMPRESS_PYTHON")
    if not python.exists():
        raise OneshotError(f"no compression environment at {python} (llmcompressor): run {SETUP_HINT}, "
                           "or set LLMSERVE_COMPRESS_PYTHON")
    return python


def linear_input_sizes(config) -> dict[str, int]:
    """Input width of each kind of decoder linear of a Llama-style config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "gate_proj": hidden,
            "up_proj": hidden, "down_proj": config.intermediate_size, "o_proj": heads * head_dim}


def check_group_size(group_size: int, inputs: dict[str, int]) -> None:
    """vLLM's CPU W4A16 kernel (and GPTQ's groups) need a group size that divides every input."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"w4a16: group_size must be a positive even number, got {group_size}")
    bad = {name: size for name, size in inputs.items() if size % group_size}
    if bad:
        fits = [g for g in (128, 64, 32, 16) if all(s % g == 0 for s in inputs.values())]
        hint = f" (group_size={fits[0]} fits this model)" if fits else ""
        raise ValueError(f"w4a16: group_size {group_size} does not divide the input size of "
                         f"{', '.join(f'{n} ({s})' for n, s in sorted(bad.items()))}{hint}")


def job_request(name: str, params: dict) -> dict:
    """The recipe part of the job's request for method `name` with its parsed `params`."""
    # llmcompressor's ignore list matches whole module names or "re:" patterns; `keep` holds
    # name fragments (as for quantize-int8/4), so each becomes a pattern.
    request = {"scheme": SCHEMES[name],
               "ignore": [f"re:.*{re.escape(k)}.*" for k in params["keep"].split("+") if k]}
    if name == "w8a8":
        request |= {"smoothing_strength": params["smoothing_strength"], "dampening": params["dampening"]}
    elif name == "w4a16":
        request |= {"group_size": params["group_size"], "symmetric": params["symmetric"],
                    "dampening": params["dampening"]}
    elif name == "sparsegpt-2of4":
        request |= {"dampening": params["dampening"]}
    return request


def run_job(request: dict, work: Path, progress: Callable[[str], None]) -> None:
    """Run `oneshot_job.py` with `request` in the compression environment, its log lines passed
    on as progress; a failure raises with the log's tail."""
    python = compress_python()
    path = work / f"request-{request['mode']}.json"
    path.write_text(json.dumps(request))
    env = {**os.environ, "PYTHONUTF8": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    tail: list[str] = []
    with subprocess.Popen([str(python), str(JOB_SCRIPT), str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=work) as job:
        for line in job.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-25:]
            if line.startswith("[oneshot]"):
                progress(line[len("[oneshot] "):])
            elif line:
                print(f"  {line}", file=sys.stderr, flush=True)
    if job.returncode != 0:
        raise OneshotError(f"llmcompressor failed (exit {job.returncode}):\n" + "\n".join(tail))


def window_logits(logits_dir: Path, windows: list[list[int]]):
    """A gate candidate (token ids -> logits) answering from the job's saved logits."""
    index = {tuple(ids): i for i, ids in enumerate(windows)}

    def run(ids: list[int]) -> np.ndarray:
        return np.load(logits_dir / f"{index[tuple(ids)]}.npy")

    return run


def quantization_format(config: dict) -> dict | None:
    """{"scheme", "gpu_only", "reason", "activations"} of a compressed-tensors config.json, None if
    unquantized; `activations` says whether it quantizes activations too (W8A8), not only weights.
    Float (FP8/FP4) weights or activations need a GPU; int8 W8A8 and int4 W4A16 run on vLLM's CPU
    build (its CPUInt8ScaledMM and CPUWNA16 kernels)."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    if quant.get("quant_method") != "compressed-tensors":
        return {"scheme": quant.get("quant_method", "unknown"), "gpu_only": True, "activations": False,
                "reason": f"{quant.get('quant_method')} checkpoints are not checked on vLLM's CPU build here"}
    args = [a for group in quant.get("config_groups", {}).values()
            for a in (group.get("weights"), group.get("input_activations")) if a]
    floats = [a for a in args if a.get("type") == "float"]
    activations = any(group.get("input_activations") for group in quant.get("config_groups", {}).values())
    bits = sorted({a.get("num_bits") for a in args if a.get("num_bits")})
    scheme = quant.get("format", "compressed-tensors")
    if floats:
        return {"scheme": scheme, "gpu_only": True, "activations": activations,
                "reason": f"{floats[0]['num_bits']}-bit float quantization needs a GPU with FP8 support"}
    return {"scheme": scheme, "gpu_only": False, "activations": activations,
            "reason": f"int{'/'.join(map(str, bits))}"}
