"""The one ``tritonserver`` command line, shared by the operator's pod template and local runs.

The operator renders it into the Triton container of every model-version Deployment, and the test
bed runs it as a local process (``llmserve.testbed.triton``). Building it in one pure function keeps
the two from drifting: whatever a data-plane test proves about a flag is true of the pods.

Choices that matter for serving (DESIGN §5):

- ``--model-control-mode=explicit`` with one ``--load-model`` per model: Triton loads exactly what
  the pod was created for, never polls the repository (POLL-mode reloads cause downtime,
  triton server#2076/#5757) and never loads a stray model. ``*`` ("load everything") is refused.
- ``--strict-readiness=true``: ``/v2/health/ready`` is true only once every loaded model is ready,
  so the readiness probe gates traffic on the model, not on the HTTP listener.
- ``--exit-on-error=true``: a model that fails to load kills the container, which Kubernetes
  reports (CrashLoopBackOff) instead of a pod that is Running but serves nothing.
- ``--disable-auto-complete-config``: the served config is exactly the ``config.pbtxt`` in the
  version's artifact, part of its identity; Triton does not fill in or alter fields.
- Metrics on, sampled every ``metrics_interval_ms``: the canary analysis and the autoscaler read
  ``nv_inference_*`` through Prometheus. ``summary_latencies=true`` adds the request-latency
  summaries (``nv_inference_request_summary_us{quantile="0.99"}``, a per-pod quantile over
  Triton's 60 s sliding window): Triton exports no latency histogram for non-decoupled models, so
  these summaries are the only tail latency it offers; the default cumulative counters give only
  a mean.
- Logs go to stdout/stderr (``kubectl logs``; a file when run locally), info/warning/error on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002


def tritonserver_command(
    model_repository: str,
    models: Iterable[str],
    *,
    executable: str = "tritonserver",
    address: str = "0.0.0.0",
    http_port: int = HTTP_PORT,
    grpc_port: int = GRPC_PORT,
    metrics_port: int = METRICS_PORT,
    metrics_interval_ms: int = 1000,
    log_verbose: int = 0,
    backend_directory: str | None = None,
    backend_config: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Return the argv that starts Triton serving ``models`` from ``model_repository``.

    ``address`` binds HTTP, gRPC and metrics alike (``0.0.0.0`` in a pod, loopback locally).
    ``backend_directory`` is only set where the backends do not live in the image's default
    ``/opt/tritonserver/backends`` (the local test bed). ``backend_config`` maps a backend name to
    its settings, rendered as ``--backend-config=<backend>,<key>=<value>``.

    Raises ``ValueError`` for input Triton would only reject at start-up, inside a pod.
    """
    names = list(models)
    if not names:
        raise ValueError("at least one model must be loaded: explicit model control loads nothing by default")
    for name in names:
        if not name or name == "*" or "," in name or "/" in name:
            raise ValueError(f"invalid model name {name!r}: name each model to load explicitly")
    if len(set(names)) != len(names):
        raise ValueError(f"model names repeat: {names}")
    ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    for key, port in ports.items():
        if not 0 < port < 65536:
            raise ValueError(f"{key}={port} is not a TCP port")
    if len(set(ports.values())) != len(ports):
        raise ValueError(f"HTTP, gRPC and metrics ports must differ: {ports}")
    if metrics_interval_ms <= 0:
        raise ValueError(f"metrics_interval_ms must be positive, not {metrics_interval_ms}")

    argv = [
        executable,
        f"--model-repository={model_repository}",
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in names),
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=true",
        f"--metrics-address={address}",
        f"--metrics-port={metrics_port}",
        f"--metrics-interval-ms={metrics_interval_ms}",
        "--metrics-config=summary_latencies=true",
        "--log-info=true",
        "--log-warning=true",
        "--log-error=true",
        f"--log-verbose={log_verbose}",
    ]
    if backend_directory is not None:
        argv.append(f"--backend-directory={backend_directory}")
    for backend, settings in (backend_config or {}).items():
        argv.extend(f"--backend-config={backend},{key}={value}" for key, value in settings.items())
    return argv
