"""Compression methods on an in-memory Hugging Face causal LM (PyTorch, CPU).

Each method takes the model, its parameters and a `Context` (teacher, tokenizer, calibration
text, progress) and returns the (possibly new) model. They need a Llama-style decoder
(`model.model.layers[i].self_attn.{q,k,v,o}_proj`, `.mlp.{gate,up,down}_proj`: Llama, Mistral,
Qwen2, SmolLM); any other architecture is refused with a clear message.

- quantize-int8 / quantize-int4: round-to-nearest weight-only quantization per block of input
  channels, stored de-quantized (the HF directory stays loadable everywhere) so the gate measures
  exactly the quantization error; `llmserve build --variant w8|w4` turns the same scheme into
  ONNX Runtime MatMulNBits, reading block size, symmetry and zero points from the lineage.
- prune-2of4: 2:4 semi-structured sparsity (two of every four consecutive input weights zero),
  by weight magnitude or by Wanda's |weight| x input-activation-norm score.
- drop-layers: removes whole decoder layers, those that change the hidden state least on
  calibration text (ShortGPT's block influence), or the ones named.
- narrow-mlp: keeps the MLP neurons with the largest mean |activation| x |down-projection column|.
- distill: trains the model (the student) on the teacher's soft labels: KL on temperature-scaled
  logits plus cross-entropy on the text, AdamW, on the CPU.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MethodError(Exception):
    """A method that does not fit the model or got bad parameters."""


@dataclass
class Context:
    teacher: torch.nn.Module
    tokenizer: object
    train_text: str
    progress: Callable[[str], None]

    def calibration_batch(self, sequences: int = 8, length: int = 128) -> torch.Tensor:
        ids = self.tokenizer(self.train_text[:200_000], add_special_tokens=False)["input_ids"]
        if len(ids) < length + 1:
            raise MethodError(f"calibration text too short: {len(ids)} tokens")
        step = max(1, (len(ids) - length) // sequences)
        return torch.tensor([ids[i * step:i * step + length] for i in range(sequences)
                             if i * step + length <= len(ids)])


# -- parameters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    defaults: dict
    run: Callable
    help: str
    # Run by llmcompressor in the compression environment after every in-process method (its
    # `run` here only checks that the method fits the model); see oneshot.py.
    oneshot: bool = False
    # Parameters that take one of a few words, checked by `parse` (before any model is loaded).
    choices: dict = field(default_factory=dict)


def parse(spec: str) -> tuple[str, dict]:
    """`name:key=value,key=value` -> (name, params with defaults applied and types checked)."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    method = METHODS[name]
    params = dict(method.defaults)
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or key not in method.defaults:
            raise MethodError(f"{name}: unknown parameter {pair!r} (parameters: "
                              f"{', '.join(f'{k}={v}' for k, v in method.defaults.items())})")
        params[key] = _typed(name, key, value, method.defaults[key])
        if key in method.choices and params[key] not in method.choices[key]:
            raise MethodError(f"{name}: {key} must be {' or '.join(method.choices[key])}, not {value!r}")
    return name, params


def _typed(method: str, key: str, value: str, default):
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise MethodError(f"{method}: {key}={value!r} is not a {type(default).__name__}") from None
    return value


# -- structure -----------------------------------------------------------------------------------


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(l, "mlp") and hasattr(l.mlp, "down_proj")
                                 and hasattr(l, "self_attn") for l in layers):
        arch = (model.config.architectures or [model.config.model_type])[0]
        raise MethodError(f"{arch} is not a Llama-style decoder (model.layers[*].self_attn and "
                          ".mlp.gate_proj/up_proj/down_proj): this method does not fit it")
    return layers


def _linears(model) -> dict[str, torch.nn.Linear]:
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        for owner in (layer.self_attn, layer.mlp):
            for name in LINEAR_NAMES:
                if isinstance(getattr(owner, name, None), torch.nn.Linear):
                    found[f"model.layers.{i}.{'self_attn' if owner is layer.self_attn else 'mlp'}.{name}"] = getattr(owner, name)
    return found


def _rebuilt(model, config, state: dict):
    """A fresh model of `config` holding `state` (layer indices, KV-cache slots and sizes all
    follow the new configuration)."""
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise MethodError(f"rebuilding the model failed: missing {missing}, unexpected {unexpected}")
    fresh.generation_config = model.generation_config
    return fresh.eval()


# -- quantization ----------------------------------------------------------------------------------


def fake_quantize(weight: torch.Tensor, bits: int, block_size: int, symmetric: bool,
                  zero_point: str = "int") -> torch.Tensor:
    """Round-to-nearest per block of `block_size` input channels, returned de-quantized, on the
    grid ONNX Runtime's MatMulNBits stores. Symmetric: levels -2^(b-1)..2^(b-1)-1, scale absmax /
    (2^(b-1) - 1) of the block. Asymmetric, `zero_point="int"`: 0..2^b-1 over the block's range
    widened to include 0, an integer zero point (ORT's default quantizer). `zero_point="float"`:
    the block's own min and max on the grid with a float zero point (llama.cpp's Q4_1 layout;
    MatMulNBits takes float zero points), computed as ORT's HQQ quantizer does without its
    optimization so that the ONNX build reproduces these weights."""
    out_dim, in_dim = weight.shape
    if in_dim % block_size:
        raise MethodError(f"input size {in_dim} is not a multiple of block_size {block_size}")
    w = weight.detach().float().reshape(out_dim, in_dim // block_size, block_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (w.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12)
        q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
        deq = q * scale
    elif zero_point == "float":
        qmax = 2 ** bits - 1
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        span = torch.where(hi > lo, hi - lo, torch.full_like(hi, qmax))
        inverse = (qmax / span).clamp(max=2e4)
        zero = -lo * inverse
        q = torch.clamp(torch.round(w * inverse + zero), 0, qmax)
        deq = (q - zero) * (1.0 / inverse)
    else:
        qmax = 2 ** bits - 1
        lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-12)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
        deq = (q - zero) * scale
    return deq.reshape(out_dim, in_dim).to(weight.dtype)


def _quantize(bits: int):
    def run(model, params: dict, ctx: Context):
        if params["zero_point"] == "float" and params["symmetric"]:
            raise MethodError(f"quantize-int{bits}: zero_point=float needs symmetric=false "
                              "(a symmetric grid has no zero point)")
        linears = _linears(model)
        keep = [k for k in params["keep"].split("+") if k]
        done = 0
        for name, linear in linears.items():
            if any(k in name for k in keep):
                continue
            with torch.no_grad():
                linear.weight.copy_(fake_quantize(linear.weight, bits, params["block_size"],
                                                  params["symmetric"], params["zero_point"]))
            done += 1
        ctx.progress(f"quantize-int{bits}: {done} of {len(linears)} decoder linears on the "
                     f"{bits}-bit grid (embeddings and lm_head stay full precision)")
        return model

    return run


# -- pruning -----------------------------------------------------------------------------------


def _input_norms(model, batch: torch.Tensor, linears: dict) -> dict[str, torch.Tensor]:
    """Per linear, the L2 norm of each input channel over the calibration tokens (Wanda)."""
    sums, hooks = {}, []
    for name, linear in linears.items():
        def hook(_mod, inputs, _out, name=name):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        hooks.append(linear.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


def _prune_2of4(model, params: dict, ctx: Context):
    linears = _linears(model)
    norms = (_input_norms(model, ctx.calibration_batch(), linears)
             if params["score"] == "wanda" else {})
    for name, linear in linears.items():
        w = linear.weight
        if w.shape[1] % 4:
            raise MethodError(f"prune-2of4: {name} has {w.shape[1]} inputs, not a multiple of 4")
        score = w.detach().abs().float()
        if name in norms:
            score = score * norms[name][None, :]
        groups = score.reshape(w.shape[0], -1, 4)
        drop = groups.argsort(-1)[..., :2]  # the two lowest scores of every group of four
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        with torch.no_grad():
            w.mul_(mask.reshape(w.shape).to(w.dtype))
    ctx.progress(f"prune-2of4 ({params['score']}): {len(linears)} decoder linears at 50 % sparsity")
    return model


def block_influence(model, batch: torch.Tensor) -> list[float]:
    """ShortGPT's block influence per layer: 1 - cosine(input hidden state, output hidden state),
    averaged over calibration tokens. Low: the layer barely changes anything."""
    with torch.no_grad():
        hidden = model(input_ids=batch, output_hidden_states=True).hidden_states
    scores = []
    for before, after in zip(hidden[:-1], hidden[1:]):
        cos = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
        scores.append(float((1 - cos).mean()))
    return scores


def _drop_layers(model, params: dict, ctx: Context):
    layers = decoder_layers(model)
    total = len(layers)
    if params["layers"]:
        try:
            drop = sorted({int(i) for i in params["layers"].split("+")})
        except ValueError:
            raise MethodError(f"drop-layers: layers must be indices joined by '+', "
                              f"e.g. 3+4, got {params['layers']!r}") from None
        if any(i < 0 or i >= total for i in drop):
            raise MethodError(f"drop-layers: the model has layers 0..{total - 1}, got {drop}")
    else:
        if not 0 < params["count"] < total:
            raise MethodError(f"drop-layers: count must be between 1 and {total - 1} "
                              f"(the model has {total} layers), got {params['count']}")
        influence = block_influence(model, ctx.calibration_batch())
        # The last layer feeds the head directly and always looks influential; rank the rest.
        drop = sorted(sorted(range(total), key=influence.__getitem__)[:params["count"]])
        ctx.progress("drop-layers: block influence " +
                     " ".join(f"{i}:{s:.3f}" for i, s in enumerate(influence)))
    if len(drop) >= total:
        raise MethodError("drop-layers: cannot drop every layer")
    kept = [i for i in range(total) if i not in drop]
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            old, rest = key[len("model.layers."):].split(".", 1)
            if int(old) in drop:
                continue
            key = f"model.layers.{kept.index(int(old))}.{rest}"
        state[key] = value
    ctx.progress(f"drop-layers: dropped {drop}, {len(kept)} of {total} layers left")
    return _rebuilt(model, config, state)


def _narrow_mlp(model, params: dict, ctx: Context):
    layers = decoder_layers(model)
    if not 0 < params["keep"] < 1:
        raise MethodError(f"narrow-mlp: keep must be a fraction between 0 and 1, got {params['keep']}")
    width = model.config.intermediate_size
    multiple = params["multiple"]
    new_width = max(multiple, int(round(width * params["keep"] / multiple)) * multiple)
    if new_width >= width:
        raise MethodError(f"narrow-mlp: keep={params['keep']} leaves all {width} neurons "
                          f"(rounded to a multiple of {multiple})")
    downs = {f"{i}": layer.mlp.down_proj for i, layer in enumerate(layers)}
    activation = {}
    hooks = [down.register_forward_hook(
        lambda _m, inputs, _o, i=i: activation.__setitem__(
            i, activation.get(i, 0) + inputs[0].detach().float().abs().reshape(
                -1, inputs[0].shape[-1]).sum(0)))
        for i, down in downs.items()]
    try:
        with torch.no_grad():
            model(input_ids=ctx.calibration_batch())
    finally:
        for h in hooks:
            h.remove()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.intermediate_size = new_width
    state = dict(model.state_dict())
    for i, down in downs.items():
        score = activation[i] * down.weight.detach().float().norm(dim=0)
        keep = score.argsort(descending=True)[:new_width].sort().values
        prefix = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[f"{prefix}{name}.weight"] = state[f"{prefix}{name}.weight"][keep].clone()
            if f"{prefix}{name}.bias" in state:
                state[f"{prefix}{name}.bias"] = state[f"{prefix}{name}.bias"][keep].clone()
        state[f"{prefix}down_proj.weight"] = state[f"{prefix}down_proj.weight"][:, keep].clone()
    ctx.progress(f"narrow-mlp: MLP width {width} -> {new_width} in {len(layers)} layers")
    return _rebuilt(model, config, state)


# -- distillation ----------------------------------------------------------------------------------


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, targets)
    (Hinton et al.: the T^2 keeps the soft-label gradients' scale independent of T)."""
    t = temperature
    vocab = student_logits.shape[-1]
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(student_logits.reshape(-1, vocab) / t, -1),
        torch.log_softmax(teacher_logits.reshape(-1, vocab) / t, -1),
        log_target=True, reduction="batchmean")
    ce = torch.nn.functional.cross_entropy(student_logits.reshape(-1, vocab), targets.reshape(-1))
    return alpha * t * t * kl + (1 - alpha) * ce


def cpu_threads() -> int:
    """CPUs this process may run on (its affinity, which a container's cpuset narrows), for
    torch's intra-op pool: more threads than CPUs only adds contention."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def training_device() -> torch.device:
    """The GPU when this process was given one (a Job's pod with nvidia.com/gpu sees it through
    CUDA), else the CPU: the same training code runs on either."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_batch(ids: torch.Tensor, length: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `length` tokens from the token stream `ids` ([batch, length])."""
    starts = torch.randint(0, len(ids) - length + 1, (batch,), generator=gen)
    return torch.stack([ids[s:s + length] for s in starts])


def eta_line(step: int, steps: int, loss: float, elapsed: float) -> str:
    """One progress line: step, loss, seconds per step and the time left at that pace."""
    per_step = elapsed / step
    return (f"distill: step {step}/{steps} loss {loss:.4f} ({per_step:.2f} s/step, "
            f"{elapsed:.0f}s elapsed, ~{per_step * (steps - step):.0f}s left)")


def _distill(model, params: dict, ctx: Context):
    """Student training on the GPU if there is one, else on the CPU, made cheap where it costs no
    quality: bf16 autocast (AVX512-BF16 / AMX and GPUs run it natively; master weights and AdamW
    stay fp32), the teacher as a bf16 copy run once per batch under inference mode, the tied
    embedding/lm_head frozen (the student keeps the teacher's vocabulary geometry, and the largest
    weight gradient and its AdamW state go away), and on the CPU torch's threads sized to the CPUs
    this process may use. The trained model comes back on the CPU."""
    if not 0 <= params["alpha"] <= 1 or params["temperature"] <= 0 or params["steps"] < 1:
        raise MethodError("distill: needs steps >= 1, temperature > 0 and 0 <= alpha <= 1")
    ids = torch.tensor(ctx.tokenizer(ctx.train_text, add_special_tokens=False)["input_ids"])
    length = params["seq_len"] + 1
    if len(ids) < length * 2:
        raise MethodError(f"distill: training text too short ({len(ids)} tokens)")
    device = training_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    dtype = torch.bfloat16 if params["bf16"] else torch.float32
    # A copy whenever it changes dtype or device: ctx.teacher stays the gate's fp32 CPU reference.
    teacher = (copy.deepcopy(ctx.teacher).to(device, dtype).eval()
               if params["bf16"] or device.type != "cpu" else ctx.teacher)
    model.to(device)
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(not params["freeze_embeddings"])
    trained = [p for p in model.parameters() if p.requires_grad]
    ctx.progress(f"distill: {sum(p.numel() for p in trained) / 1e6:.1f}M of "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters trained, "
                 f"{len(ids)} training tokens, {params['batch']}x{params['seq_len']} tokens per step, "
                 f"{'bf16' if params['bf16'] else 'fp32'}, "
                 + (f"{torch.get_num_threads()} CPU threads" if device.type == "cpu"
                    else f"on {torch.cuda.get_device_name(device)}"))
    gen = torch.Generator().manual_seed(params["seed"])
    model.train()
    opt = torch.optim.AdamW(trained, lr=params["lr"], weight_decay=0.0)
    warmup = max(1, params["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / params["steps"])))
    start = last_report = time.monotonic()
    for step in range(1, params["steps"] + 1):
        batch = training_batch(ids, length, params["batch"], gen).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.inference_mode():
            teacher_logits = teacher(input_ids=inputs).logits.float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=params["bf16"]):
            student_logits = model(input_ids=inputs).logits
        loss = distill_loss(student_logits.float(), teacher_logits, targets,
                            params["temperature"], params["alpha"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        now = time.monotonic()
        if step in (1, params["steps"]) or now - last_report >= 30:
            last_report = now
            ctx.progress(eta_line(step, params["steps"], loss.item(), now - start))
    embeddings.requires_grad_(True)
    return model.to("cpu").eval()


def _check_oneshot(name: str):
    def check(model, params: dict, ctx: Context):
        from . import oneshot

        decoder_layers(model)
        if name == "w4a16":
            try:
                oneshot.check_group_size(params["group_size"], oneshot.linear_input_sizes(model.config))
            except ValueError as exc:
                raise MethodError(str(exc)) from None
        return model

    return check


_ONESHOT_COMMON = {"dampening": 0.01, "samples": 64, "seq_len": 256, "keep": "lm_head"}

METHODS = {
    "quantize-int8": Method("quantize-int8", {"block_size": 32, "symmetric": True, "zero_point": "int",
                                              "keep": "lm_head"},
                            _quantize(8), "weight-only int8, per block of input channels",
                            choices={"zero_point": ("int", "float")}),
    "quantize-int4": Method("quantize-int4", {"block_size": 32, "symmetric": False, "zero_point": "int",
                                              "keep": "lm_head"},
                            _quantize(4), "weight-only int4, per block of input channels",
                            choices={"zero_point": ("int", "float")}),
    "prune-2of4": Method("prune-2of4", {"score": "magnitude"}, _prune_2of4,
                         "2:4 semi-structured sparsity (score: magnitude | wanda)",
                         choices={"score": ("magnitude", "wanda")}),
    "drop-layers": Method("drop-layers", {"count": 1, "layers": ""}, _drop_layers,
                          "drop decoder layers (the least influential `count`, or `layers`=3+4)"),
    "narrow-mlp": Method("narrow-mlp", {"keep": 0.75, "multiple": 16}, _narrow_mlp,
                         "keep this fraction of each MLP's neurons (by activation x weight)"),
    "distill": Method("distill", {"steps": 200, "batch": 8, "seq_len": 128, "lr": 1e-4,
                                  "temperature": 2.0, "alpha": 0.5, "seed": 0, "bf16": True,
                                  "freeze_embeddings": True}, _distill,
                      "train on the teacher's soft labels (KL) plus cross-entropy"),
    "w8a8": Method("w8a8", {"smoothing_strength": 0.8, **_ONESHOT_COMMON}, _check_oneshot("w8a8"),
                   "compressed-tensors int8 weights (GPTQ, per channel) and dynamic per-token int8 "
                   "activations after SmoothQuant, for vLLM", oneshot=True),
    "w4a16": Method("w4a16", {"group_size": 128, "symmetric": True, **_ONESHOT_COMMON},
                    _check_oneshot("w4a16"),
                    "compressed-tensors int4 weights per group (GPTQ), 16-bit activations, for vLLM",
                    oneshot=True),
    "sparsegpt-2of4": Method("sparsegpt-2of4", dict(_ONESHOT_COMMON), _check_oneshot("sparsegpt-2of4"),
                             "2:4 sparsity by SparseGPT (llmcompressor): each pruned weight's error is "
                             "compensated in the rest of its row; written dense, with the zeros",
                             oneshot=True),
    "w8a8-fp8": Method("w8a8-fp8", {"keep": "lm_head"}, _check_oneshot("w8a8-fp8"),
                       "compressed-tensors FP8 weights and dynamic FP8 activations, for vLLM on a "
                       "GPU with FP8 support (GPU-only)", oneshot=True),
}
