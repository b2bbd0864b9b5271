"""Version manifests: what a published version contains, and the checks that it still does.

A version directory `<repo>/<model>/<N>/` is immutable once published. Its `manifest.json` lists
every other file in the directory with its size and sha256, so a verifier can detect any changed,
missing or added file. The sha256 of `manifest.json` itself is the version's identity: an
LLMService may pin it (`spec.model.sha256`), which then covers every byte the pod will serve.

This module is imported by the operator's model puller (`llmserve verify` / `llmserve pull`),
which runs in the small operator image: standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
# The Triton config the version was built and gated with; `pull` installs it as the model's
# config.pbtxt so a later build of the same model can never change how this version is served.
VERSION_CONFIG = "config.pbtxt"
FORMAT = 1
_CHUNK = 1 << 20


class ManifestError(Exception):
    """A version does not match its manifest (or has none); the message names every problem."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of all regular files under `root`, sorted (symlinks are refused)."""
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise ManifestError(f"{path}: symbolic links are not allowed in a model version")
        if path.is_file():
            files.append(path.relative_to(root).as_posix())
    return files


def file_entries(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} for every file under `root` except the manifest."""
    return {
        rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
        for rel in list_files(root)
        if rel != MANIFEST
    }


def write_manifest(version_dir: Path, fields: dict) -> str:
    """Write manifest.json covering every file now in `version_dir`; returns its sha256."""
    manifest = {"format": FORMAT, **fields, "files": file_entries(version_dir)}
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (version_dir / MANIFEST).write_bytes(data)
    return sha256_bytes(data)


@dataclass(frozen=True)
class Manifest:
    data: dict
    sha256: str

    @property
    def files(self) -> dict[str, dict]:
        return self.data["files"]


def read_manifest(version_dir: Path, expected_sha256: str | None = None) -> Manifest:
    path = version_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest; not a published model version") from None
    digest = sha256_bytes(raw)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ManifestError(
            f"{path}: manifest sha256 is {digest}, expected {expected_sha256.lower()}"
        )
    try:
        data = json.loads(raw)
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and "sha256" in e and "size" in e for e in files.values()
        ):
            raise ValueError("bad 'files'")
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    for rel in files:
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ManifestError(f"{path}: file entry {rel!r} escapes the version directory")
    return Manifest(data, digest)


def verify_version(version_dir: Path, expected_sha256: str | None = None) -> Manifest:
    """Check every file of `version_dir` against its manifest; raise ManifestError naming all
    missing, changed and unlisted files."""
    if not version_dir.is_dir():
        raise ManifestError(f"{version_dir}: no such version directory")
    manifest = read_manifest(version_dir, expected_sha256)
    problems = []
    present = set(list_files(version_dir)) - {MANIFEST}
    for rel, entry in sorted(manifest.files.items()):
        path = version_dir / rel
        if rel not in present:
            problems.append(f"missing {rel}")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"size of {rel} is {path.stat().st_size}, manifest says {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"sha256 of {rel} does not match the manifest")
    problems += [f"unlisted file {rel}" for rel in sorted(present - set(manifest.files))]
    if problems:
        raise ManifestError(f"{version_dir}: " + "; ".join(problems))
    return manifest


def _copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src to dst, hashing the bytes as they are written (one read of the source)."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            fout.write(chunk)
    return digest.hexdigest(), size


# The file that tells which engine a version was built for (`llmserve build`).
ENGINE_MARKERS = {"engine.json": "vllm", "artifact.json": "onnxruntime"}
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_MODEL")
ENGINE_ARGS_PARAMETER = "engine_args"
# vLLM's engine arguments as the model will use them, for the workers of a multi-node replica
# (`vllm serve --config`, which takes only .yaml; JSON is YAML). Next to the model's config.pbtxt.
WORKER_ENGINE_ARGS = "engine-args.yaml"
VLLM_ENGINE_FILE = "engine.json"
_INSTANCE_GROUP = re.compile(r"instance_group\s*\[\s*\{[^{}\[\]]*\}\s*\]")
_ENGINE_ARGS = re.compile(
    r'parameters\s*:?\s*\{\s*key:\s*"' + ENGINE_ARGS_PARAMETER + r'"\s*value\s*:?\s*\{\s*'
    r'string_value:\s*"(?:[^"\\]|\\.)*"\s*\}\s*\}\n?')


@dataclass(frozen=True)
class Serving:
    """How this pod serves the version (the operator's rendering of spec.runtime), written into
    the pulled copy's model-level config.pbtxt; the version's own config stays as published."""

    engine: str | None = None  # refuse a version built for another engine
    instance_kind: str | None = None  # KIND_CPU | KIND_GPU | KIND_MODEL
    engine_args: dict = field(default_factory=dict)  # JSON for the model's `engine_args` parameter

    def configure(self, config: str) -> str:
        """`config` (a config.pbtxt) with this instance kind and these engine args."""
        if self.instance_kind:
            current = _INSTANCE_GROUP.search(config)
            count = re.search(r"count:\s*(\d+)", current.group(0)) if current else None
            group = f"instance_group [{{ kind: {self.instance_kind}, count: {count.group(1) if count else 1} }}]"
            config = (config[:current.start()] + group + config[current.end():] if current
                      else config.rstrip("\n") + "\n" + group + "\n")
        if self.engine_args:
            text = json.dumps(self.engine_args, sort_keys=True).replace("\\", "\\\\").replace('"', '\\"')
            config = _ENGINE_ARGS.sub("", config).rstrip("\n") + (
                f'\nparameters {{ key: "{ENGINE_ARGS_PARAMETER}" value {{ string_value: "{text}" }} }}\n')
        return config

    def worker_engine_args(self, version_dir: Path) -> str | None:
        """The engine arguments model_repo/vllm merges (the version's engine.json, then
        `engine_args`), minus the model path, which a worker names on its command line. None for
        versions of other engines."""
        defaults = version_dir / VLLM_ENGINE_FILE
        if not defaults.is_file():
            return None
        merged = {**json.loads(defaults.read_text()), **self.engine_args}
        for key in ("model", "tokenizer"):
            merged.pop(key, None)
        return json.dumps(merged, sort_keys=True, indent=1) + "\n"

    def check_engine(self, src: Path, manifest: Manifest) -> None:
        built = {engine for marker, engine in ENGINE_MARKERS.items() if marker in manifest.files}
        if self.engine and built and self.engine not in built:
            raise ManifestError(
                f"{src}: this version was built for engine {', '.join(sorted(built))}, but the service asks for "
                f"engine {self.engine}: set spec.runtime.engine to {', '.join(sorted(built))} (docs/engines.md)")


def pull(source_repo: Path, model: str, version: int, dest_repo: Path,
         expected_sha256: str | None = None, serving: Serving | None = None) -> Manifest:
    """Install `<source_repo>/<model>/<version>/` into `<dest_repo>/<model>/`, as the model
    puller does before tritonserver starts.

    Every file is verified while it is copied into a staging directory inside `dest_repo`, which
    is renamed into place only when everything matched: a failed pull leaves nothing behind. The
    version's own config.pbtxt, configured by `serving`, becomes the model's config.pbtxt. An
    already installed, intact copy of the same manifest and configuration is kept (init containers
    may run more than once).
    """
    serving = serving or Serving()
    src = source_repo / model / str(version)
    manifest = read_manifest(src, expected_sha256)
    if VERSION_CONFIG not in manifest.files:
        raise ManifestError(f"{src}: the manifest lists no {VERSION_CONFIG}")
    serving.check_engine(src, manifest)
    final = dest_repo / model
    installed = final / str(version)
    if installed.is_dir():
        try:
            worker_args = serving.worker_engine_args(installed)
            if verify_version(installed, manifest.sha256) and (final / VERSION_CONFIG).is_file() and (
                (final / VERSION_CONFIG).read_text() == serving.configure((installed / VERSION_CONFIG).read_text())
            ) and (worker_args is None or (final / WORKER_ENGINE_ARGS).is_file()
                   and (final / WORKER_ENGINE_ARGS).read_text() == worker_args):
                return manifest
        except ManifestError:
            pass  # a stale or damaged copy: replaced below
    dest_repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".pull-{model}-", dir=dest_repo))
    try:
        target = staging / model / str(version)
        problems = []
        for rel, entry in sorted(manifest.files.items()):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                digest, size = _copy_hashed(src / rel, target / rel)
            except FileNotFoundError:
                problems.append(f"missing {rel}")
                continue
            if (digest, size) != (entry["sha256"], entry["size"]):
                problems.append(f"sha256 of {rel} does not match the manifest")
        if problems:
            raise ManifestError(f"{src}: " + "; ".join(problems))
        shutil.copyfile(src / MANIFEST, target / MANIFEST)
        (staging / model / VERSION_CONFIG).write_text(serving.configure((target / VERSION_CONFIG).read_text()))
        if (worker_args := serving.worker_engine_args(target)) is not None:
            (staging / model / WORKER_ENGINE_ARGS).write_text(worker_args)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging / model, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
