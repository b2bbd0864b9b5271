"""Builds the test bed's upstream binaries from pinned Go modules, once, into a versioned cache.

Kubernetes and etcd are multi-module repositories whose main module points at its siblings with
local ``replace`` lines, so ``go install module@version`` refuses them. We build them from a small
wrapper module that requires the upstream module and replaces each local sibling with the same
sibling at its published version. Versions are stamped through ``-ldflags -X`` so kubectl and helm
see a real server version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..environments import cache_root

KUBERNETES_VERSION = "v1.33.4"
ETCD_VERSION = "v3.5.21"
KWOK_VERSION = "v0.7.0"
HELM_VERSION = "v3.18.6"
PROMETHEUS_ADAPTER_VERSION = "v0.12.0"
LWS_VERSION = "v0.7.0"

_K8S_MINOR = KUBERNETES_VERSION.lstrip("v").split(".")[1]
_K8S_STAMP = " ".join(
    f"-X {pkg}.{key}={value}"
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
    for key, value in (
        ("gitVersion", KUBERNETES_VERSION),
        ("gitMajor", "1"),
        ("gitMinor", _K8S_MINOR),
        ("gitCommit", "0" * 40),
        ("gitTreeState", "clean"),
        ("buildDate", "1970-01-01T00:00:00Z"),
    )
)


@dataclass(frozen=True)
class GoComponent:
    """One pinned upstream Go module and the commands built from it."""

    name: str
    module: str
    version: str
    commands: dict[str, str]  # binary name -> main package path
    ldflags: str = ""
    sibling_version: str = ""  # version of local siblings that upstream pins as v0.0.0 ("" = same)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def bin_dir(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}"

    def path(self, binary: str) -> Path:
        return self.bin_dir / binary

    @property
    def build_key(self) -> str:
        """What determines the binaries' bytes besides the module version: a cached build made
        with other flags or commands is rebuilt."""
        recipe = json.dumps([self.module, self.commands, self.ldflags, self.sibling_version], sort_keys=True)
        return hashlib.sha256(recipe.encode()).hexdigest()[:16]

    def is_built(self) -> bool:
        key = self.bin_dir / ".build-key"
        return (key.is_file() and key.read_text() == self.build_key
                and all(self.path(b).is_file() for b in self.commands))


KUBERNETES = GoComponent(
    name="kubernetes",
    module="k8s.io/kubernetes",
    version=KUBERNETES_VERSION,
    commands={
        "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
        "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
        "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    },
    ldflags=_K8S_STAMP,
    sibling_version="v0." + KUBERNETES_VERSION.lstrip("v").split(".", 1)[1],
)
ETCD = GoComponent(
    name="etcd",
    module="go.etcd.io/etcd/server/v3",
    version=ETCD_VERSION,
    commands={"etcd": "go.etcd.io/etcd/server/v3"},
)
KWOK = GoComponent(
    name="kwok",
    module="sigs.k8s.io/kwok",
    version=KWOK_VERSION,
    commands={"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
    ldflags=f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",
)
HELM = GoComponent(
    name="helm",
    module="helm.sh/helm/v3",
    version=HELM_VERSION,
    commands={"helm": "helm.sh/helm/v3/cmd/helm"},
    # Helm's Makefile also stamps the Kubernetes version it assumes offline (`helm template`,
    # `helm lint`): that of its client-go, v0.33 -> 1.33. Unstamped it would assume v1.20.
    ldflags=" ".join([f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"] + [
        f"-X helm.sh/helm/v3/pkg/{pkg}.k8sVersion{part}={value}"
        for pkg in ("lint/rules", "chartutil") for part, value in (("Major", "1"), ("Minor", "33"))]),
)

# Serves Prometheus queries as the custom metrics API for the HPA (docs/autoscaling.md). Not in
# COMPONENTS: only the autoscaling tests and bench/autoscaling.py start it, so `testbed up` does not
# pay for it; `testbed build` (hack/setup.sh) builds it with the rest (ON_DEMAND).
PROMETHEUS_ADAPTER = GoComponent(
    name="prometheus-adapter",
    module="sigs.k8s.io/prometheus-adapter",
    version=PROMETHEUS_ADAPTER_VERSION,
    commands={"prometheus-adapter": "sigs.k8s.io/prometheus-adapter/cmd/adapter"},
)

# The LeaderWorkerSet controller (with its webhooks) that multi-node LLMServices render into
# (docs/distributed.md). Built lazily like the adapter: only the distributed tests start it.
LWS = GoComponent(
    name="lws",
    module="sigs.k8s.io/lws",
    version=LWS_VERSION,
    commands={"lws-controller": "sigs.k8s.io/lws/cmd"},
    ldflags=f"-X sigs.k8s.io/lws/pkg/version.GitVersion={LWS_VERSION}",
)

COMPONENTS = (ETCD, KUBERNETES, KWOK, HELM)
# Started only by some tests, which build them if missing. `testbed build` (hack/setup.sh) builds
# them too: compiled inside a test on a fresh machine they outlast its timeout (the adapter took
# over 14 min on a busy 2-core machine), so the first autoscaling test failed on a fresh clone.
ON_DEMAND = (PROMETHEUS_ADAPTER, LWS)


class BuildError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


def _go() -> str:
    go = shutil.which("go")
    if not go:
        raise BuildError("the Go toolchain is needed to build the test bed (install Go >= 1.24)")
    return go


def _run(cmd: list[str], cwd: Path, log_path: Path, label: str) -> None:
    """Run a long build step; every 30 s print the elapsed time and how many output lines
    (modules downloaded, or packages compiled with ``go build -v``) it has produced."""
    env = {**os.environ, "GOFLAGS": "-buildvcs=false"}
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def progress() -> None:
            while not done.wait(30):
                with open(log_path, "rb") as f:
                    f.seek(offset)
                    count = f.read().count(b"\n")
                _log(f"  {label}: {int(time.monotonic() - started)}s, {count} packages/modules so far")

        threading.Thread(target=progress, daemon=True).start()
        try:
            rc = proc.wait()
        except BaseException:  # interrupted (a test's timeout, Ctrl-C): leave no orphan compiling
            proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise BuildError(f"{label} failed (exit {rc}); last lines of {log_path}:\n{tail}")


def _local_replacements(upstream_gomod: str, fallback_version: str) -> dict[str, str]:
    """Sibling modules that upstream's go.mod replaces with a directory of its own repository,
    mapped to the published version to use instead: upstream's own requirement of that sibling,
    or ``fallback_version`` where upstream requires the placeholder v0.0.0 (Kubernetes staging)."""
    required = dict(re.findall(r"^\s*(?:require\s+)?(\S+)\s+(v\S+)(?:\s*//.*)?$", upstream_gomod, re.M))
    replaced = {}
    for line in upstream_gomod.splitlines():
        m = re.match(r"^\s*(?:replace\s+)?(\S+)\s*=>\s*(\.\.?/\S+)\s*$", line)
        if m and "FORBIDDEN" not in m.group(2):
            version = required.get(m.group(1), "v0.0.0")
            replaced[m.group(1)] = fallback_version if version == "v0.0.0" else version
    return replaced


def build(component: GoComponent) -> None:
    """Build one component into its cache directory unless it is already there. Another process
    building the same component (a parallel test session, setup) is waited for, not clobbered."""
    if component.is_built():
        return
    lock_path = cache_root() / "build" / f"{component.name}-{component.version}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not component.is_built():
            _build(component)


def _build(component: GoComponent) -> None:
    go = _go()
    work = cache_root() / "build" / f"{component.name}-{component.version}"
    shutil.rmtree(work, ignore_errors=True)  # a stale wrapper go.mod would break the download
    work.mkdir(parents=True)
    log_path = work / "build.log"
    log_path.write_text("")
    _log(f"building {component.name} {component.version} from {component.module} "
         f"(first time only; Kubernetes takes ~20-40 min on 2 cores)")
    info = subprocess.run(
        [go, "mod", "download", "-json", f"{component.module}@{component.version}"],
        cwd=work, capture_output=True, text=True,
    )
    if info.returncode != 0:
        raise BuildError(f"cannot download {component.module}@{component.version}: {info.stdout}{info.stderr}")
    upstream = Path(json.loads(info.stdout)["GoMod"]).read_text()
    go_line = re.search(r"^go (\S+)", upstream, re.M)
    siblings = _local_replacements(upstream, component.sibling_version or component.version)
    replaces = "".join(f"\t{m} => {m} {v}\n" for m, v in siblings.items())
    (work / "go.mod").write_text(
        f"module llmserve.dev/testbed/{component.name}\n\n"
        f"go {go_line.group(1) if go_line else '1.24'}\n\n"
        f"require {component.module} {component.version}\n"
        + (f"\nreplace (\n{replaces})\n" if replaces else "")
    )
    imports = "".join(f'\t_ "{pkg}"\n' for pkg in component.commands.values())
    (work / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports})\n")
    _run([go, "mod", "tidy"], work, log_path, f"{component.name}: resolving modules")
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    _run([go, "build", "-v", "-trimpath", "-ldflags", f"-s -w {component.ldflags}".strip(),
          "-o", str(out) + "/", *component.commands.values()],
         work, log_path, f"{component.name}: compiling")
    for binary, pkg in component.commands.items():
        parts = pkg.rstrip("/").split("/")
        built = out / (parts[-2] if re.fullmatch(r"v\d+", parts[-1]) else parts[-1])
        if built.name != binary:
            built.rename(out / binary)
    component.bin_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(component.bin_dir, ignore_errors=True)
    (out / ".build-key").write_text(component.build_key)
    out.rename(component.bin_dir)  # atomic: a half-built cache is never mistaken for a good one
    _log(f"built {component.name} {component.version} into {component.bin_dir}")


def ensure_all(components: tuple[GoComponent, ...] = COMPONENTS) -> dict[str, Path]:
    """Build whatever is missing and return binary name -> path for every component."""
    paths = {}
    for component in components:
        build(component)
        paths.update({b: component.path(b) for b in component.commands})
    return paths
