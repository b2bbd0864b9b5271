"""Run ``llmserve predictor`` as a local process, as the pod's sidecar runs it.

Pods in the test bed are simulated, so the data-plane tests, the benchmark and the quickstart run
the predictor here, next to a local ``TritonServer`` (``llmserve.testbed.triton``), with the argv
the operator renders (``predictor_command``) on a free loopback port:

    with TritonServer(repo, {"generate": 1}) as triton, LocalPredictor(triton.grpc_url, "generate") as p:
        OpenAI(base_url=p.openai_base_url, api_key="unused").chat.completions.create(...)

Only the standard library and the test bed's process helpers are imported, so callers need not
install kserve in their own process (the child process does the serving).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from llmserve.predictors.cli import predictor_command

from .procs import LocalServer
from .triton import _http_ok


class PredictorError(RuntimeError):
    """The predictor process failed to start or to become ready; the message has its log tail."""


class LocalPredictor(LocalServer):
    """``llmserve predictor --triton-grpc <triton_grpc> --model <model>`` on 127.0.0.1.

    ``flags`` are further predictor flags by dest name (``max_concurrency=2``, ``access_log=True``). ``start`` returns
    once the predictor is live and, with ``wait_ready`` (default), once it reports ready, which
    means Triton has the model ready.
    """

    what, log_name, error = "the predictor", "predictor.log", PredictorError
    workdir_prefix = "llmserve-predictor-"
    stop_grace = 15.0  # uvicorn shuts down gracefully on SIGTERM

    def __init__(self, triton_grpc: str, model: str, *, startup_timeout: float = 60.0,
                 **flags: bool | int | float) -> None:
        self.triton_grpc = triton_grpc
        self.model = model
        self.flags = flags
        self.startup_timeout = startup_timeout
        self._until_ready = True
        super().__init__()

    @property
    def openai_base_url(self) -> str:
        """What the official client takes as ``base_url``."""
        return f"{self.url}/v1"


    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def returncode(self) -> int | None:
        """The exit status once the process has ended, else None."""
        return self._process.returncode() if self._process is not None else None

    @property
    def command(self) -> list[str]:
        # The console script `llmserve` of this interpreter, run as a module so it is the same venv.
        argv = predictor_command(self.triton_grpc, self.model, http_port=self.port, **self.flags)
        return [sys.executable, "-m", "llmserve", *argv[1:]]

    def start(self, *, wait_ready: bool = True) -> LocalPredictor:
        self._until_ready = wait_ready
        return super().start()

    def _command(self, workdir: Path) -> tuple[list[str], None]:
        self.port = self.pick_ports(1)[0]
        return self.command, None

    def _wait_ready(self) -> None:
        self._wait("live", "/v2/health/live")
        if self._until_ready:
            self._wait("ready", "/v2/health/ready")

    def _wait(self, what: str, path: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not _http_ok(self.url + path):
            self._raise_if_failed(f"before it was {what}")
            if time.monotonic() > deadline:
                raise PredictorError(f"the predictor was not {what} after {self.startup_timeout:.0f}s ({self.url}{path})"
                                     f"\n--- log tail ---\n{self.log_tail()}")
            time.sleep(0.1)


