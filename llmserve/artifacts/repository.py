"""Triton model repositories: the shipped model code, config.pbtxt rendering, and publishing an
immutable version atomically.

A published version `<repo>/<model>/<N>/` is self-contained: the model's `model.py` (copied from
the shipped `model_repo/<kind>/1/model.py`), the ONNX artifact, tokenizer files, `artifact.json`
(what model.py needs to run the artifact), the `config.pbtxt` it was built and gated with, and
`manifest.json`. So code and weights move, verify and roll back together. The model-level
`<repo>/<model>/config.pbtxt` that Triton reads is a copy of the newest version's config; the
model puller installs the served version's own copy instead.

Standard library only: `llmserve verify` and the unit tests import this without torch.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import VERSION_CONFIG

KINDS = ("embedding", "generate")
# Where the shipped model code lives: a source checkout's model_repo/ (the builder runs from one).
SHIPPED_REPO = Path(__file__).resolve().parents[2] / "model_repo"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class PublishError(Exception):
    """The version cannot be published (bad name, version exists, unwritable repository)."""


def shipped_model_code(kind: str) -> Path:
    path = SHIPPED_REPO / kind / "1" / "model.py"
    if not path.is_file():
        raise PublishError(
            f"{path}: shipped model code not found; run `llmserve build` from a source checkout"
        )
    return path


@dataclass(frozen=True)
class ServingConfig:
    """What config.pbtxt controls about serving: batching and instances."""

    max_batch_size: int = 32
    instances: int = 1
    queue_delay_us: int = 2000
    # Extra python-backend parameters, e.g. EXECUTION_ENV_PATH for a packed Python environment.
    parameters: dict[str, str] = field(default_factory=dict)


# Tensor interface of each kind. Every tensor has a leading batch dimension (max_batch_size > 0),
# so one request may carry several rows and the dynamic batcher can merge requests.
_IO = {
    "embedding": (
        [("text", "TYPE_STRING", [1], False)],
        [("embedding", "TYPE_FP32", [-1]), ("token_count", "TYPE_INT32", [1])],
    ),
    "generate": (
        [
            ("text_input", "TYPE_STRING", [1], True),
            ("messages", "TYPE_STRING", [1], True),
            ("max_tokens", "TYPE_INT32", [1], True),
            ("temperature", "TYPE_FP32", [1], True),
            ("top_p", "TYPE_FP32", [1], True),
            ("seed", "TYPE_UINT64", [1], True),
            ("stop", "TYPE_STRING", [-1], True),
            ("stream", "TYPE_BOOL", [1], True),
        ],
        [
            ("text_output", "TYPE_STRING", [1]),
            ("finish_reason", "TYPE_STRING", [1]),
            ("prompt_tokens", "TYPE_INT32", [1]),
            ("completion_tokens", "TYPE_INT32", [1]),
        ],
    ),
}


def render_config(name: str, kind: str, serving: ServingConfig,
                  parameters: dict[str, str] | None = None) -> str:
    """The python-backend config.pbtxt of a model of `kind`. `parameters` are model facts the
    clients read through the model-config API (e.g. context_length, embedding_dim)."""
    inputs, outputs = _IO[kind]
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {serving.max_batch_size}",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {serving.queue_delay_us}",
        "}",
        f"instance_group [{{ kind: KIND_CPU, count: {serving.instances} }}]",
    ]
    if kind == "generate":
        # Decoupled: a request may get many responses (streamed tokens) and the generation loop
        # answers requests of one batch as each of them finishes.
        lines.append("model_transaction_policy { decoupled: true }")
    for tname, dtype, dims, optional in inputs:
        opt = " optional: true" if optional else ""
        lines.append(f'input {{ name: "{tname}" data_type: {dtype} dims: {dims}{opt} }}')
    for tname, dtype, dims in outputs:
        lines.append(f'output {{ name: "{tname}" data_type: {dtype} dims: {dims} }}')
    params = {**(parameters or {}), **serving.parameters}
    for key in sorted(params):
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{params[key]}" }} }}')
    return "\n".join(lines) + "\n"


def check_model_name(name: str) -> str:
    if not _MODEL_NAME.match(name):
        raise PublishError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (max 63)"
        )
    return name


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    )


@contextmanager
def _locked(model_dir: Path):
    """Serialize publishers of one model (two builds must not pick the same N)."""
    with open(model_dir / ".publish.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def staging_dir(repo: Path, model: str) -> Path:
    """A fresh hidden directory beside the versions (same filesystem, so the final rename is
    atomic; Triton ignores non-numeric entries)."""
    model_dir = repo / check_model_name(model)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PublishError(f"cannot create {model_dir}: {exc.strerror}") from None
    staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    staged.chmod(0o755)  # mkdtemp's 0700 would hide the published version from other users
    return staged


def check_version_free(repo: Path, model: str, version: int | None) -> None:
    """Fail early (before a slow build) when an explicitly requested version exists."""
    if version is not None and (repo / model / str(version)).exists():
        raise PublishError(f"{repo / model / str(version)} already exists; versions are immutable")


def publish(staged: Path, repo: Path, model: str, version: int | None = None) -> int:
    """Move a fully written staging directory into place as version `version` (default: the next
    one) and make its config the model's config. Never replaces an existing version."""
    model_dir = repo / model
    with _locked(model_dir):
        if version is None:
            version = max(existing_versions(model_dir), default=0) + 1
        elif version < 1:
            raise PublishError(f"version must be a positive integer, got {version}")
        target = model_dir / str(version)
        if target.exists():
            raise PublishError(f"{target} already exists; versions are immutable")
        os.rename(staged, target)
        tmp = model_dir / f".{VERSION_CONFIG}.tmp"
        shutil.copyfile(target / VERSION_CONFIG, tmp)
        os.replace(tmp, model_dir / VERSION_CONFIG)
    return version
