"""Local processes the tests run (Triton, Prometheus, the predictor, controllers): free ports, a log file each, clean shutdown."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct ports the kernel just found free on ``host``.

    The sockets stay open until all ports are chosen so the kernel cannot hand out one twice. A
    port can still be taken before the caller binds it; callers report the bind error with the
    process log rather than guessing.
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file, or a note saying why there is none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"(empty log at {path})"


@contextmanager
def _children_on(cpus: frozenset[int] | None) -> Iterator[None]:
    """Processes started inside run on ``cpus`` (None: anywhere), like a pod given a cpuset.

    A forked child inherits the CPU mask of the thread that forks it, and on Linux
    ``sched_setaffinity(0, ...)`` sets only the calling thread's mask: narrowing it around the
    fork is safe while other threads start their own servers."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class LocalProcess:
    """A child process in its own session, with stdout and stderr in one log file.

    Its own session makes it the leader of a process group, so ``stop`` can also reach the
    processes it forked (Triton's python-backend stubs) even after the leader is gone.
    ``cpus`` confines it and everything it starts to those CPUs.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._cpus = cpus
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; its output goes to ``log_path`` (truncated first)."""
        with open(self.log_path, "wb") as log, _children_on(self._cpus):
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def returncode(self) -> int | None:
        """The exit status, or None while the process runs (or before it started)."""
        return self._proc.poll() if self._proc else None

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM the leader, as the kubelet stops a container, and wait up to ``timeout``
        seconds: its exit status, or None if it still runs (or never started)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        return proc.returncode

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the leader so it shuts down cleanly, SIGKILL it after ``grace`` seconds, then
        SIGKILL whatever is left of its process group. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if self.terminate(grace) is None:
            proc.kill()
            proc.wait()
        self._proc = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class PortTaken(RuntimeError):
    """A port picked free was bound by another process before the server bound it."""


class LocalServer:
    """The shared skeleton of a local server the tests run: one scratch directory (config, data,
    log) and one ``LocalProcess``, both removed by ``stop``. Subclasses set ``what`` (for
    messages), ``log_name``, ``error`` and ``workdir_prefix`` and implement ``_command`` (write
    what the process needs into the scratch directory, pick its ports with ``pick_ports``, return
    its argv and environment) and ``_wait_ready`` (calling ``_raise_if_failed`` while it waits).

    Ports are picked free, then bound by the process a moment (Triton: seconds) later; another
    process can take one in between. A start whose log says so (``port_taken``) is stopped and
    tried again on fresh ports, at most ``start_attempts`` times."""

    what = "the server"
    log_name = "server.log"
    workdir_prefix = "llmserve-server-"
    error: type[Exception] = RuntimeError
    stop_grace = 30.0
    # What Go (listen tcp ...: bind: address already in use) and Python ([Errno 98] ...) servers log.
    port_taken = re.compile(r"address already in use", re.IGNORECASE)
    start_attempts = 3

    def __init__(self, cpus: frozenset[int] | None = None) -> None:
        self.port = 0
        self.cpus = cpus
        self.pick_ports: Callable[[int], list[int]] = free_ports
        self._workdir: Path | None = None
        self._process: LocalProcess | None = None
        self._log_checked = 0  # bytes of the log already searched for ``port_taken``

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._workdir is None:
            raise self.error(f"{self.what} has not been started")
        return self._workdir / self.log_name

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def start(self):
        """Start the process in a fresh scratch directory and return once ``_wait_ready`` does,
        on fresh ports again if another process took one; on any failure (or interrupt) nothing
        is left running or on disk."""
        if self._process is not None:
            raise self.error(f"{self.what} is already running")
        for attempt in range(1, self.start_attempts + 1):
            try:
                return self._start_once()
            except PortTaken as exc:
                if attempt == self.start_attempts:
                    raise self.error(f"{attempt} starts in a row: {exc}") from exc

    def _start_once(self):
        self._workdir = Path(tempfile.mkdtemp(prefix=self.workdir_prefix))
        self._log_checked = 0
        try:
            argv, env = self._command(self._workdir)
            self._process = LocalProcess(argv, self.log_path, env=env, cwd=self._workdir, cpus=self.cpus)
            self._process.start()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, workdir: Path) -> tuple[list[str], Mapping[str, str] | None]:
        """Prepare ``workdir`` and pick ports; the argv and environment (None: ours) to run."""
        raise NotImplementedError

    def _wait_ready(self) -> None:
        """Return once the server serves; raise ``error`` with the log tail if it cannot."""
        raise NotImplementedError

    def _raise_if_failed(self, when: str) -> None:
        """For ``_wait_ready``: raise ``PortTaken`` once the log says a port given was taken, and
        ``error`` with the command and the log tail once the process has exited (``when`` says at
        which step, e.g. "before model m was ready")."""
        code = self._process.returncode()  # before the log, so an exit's last words are in it
        if self._logged_port_taken(complete=code is not None):
            raise PortTaken(f"{self.what} lost a port it was given to another process"
                            f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}")
        if code is not None:
            raise self.error(f"{self.what} exited with status {code} {when} (command: {' '.join(self._process.argv)})"
                             f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}")

    def _logged_port_taken(self, complete: bool) -> bool:
        """Whether the lines logged since the last call say a port was taken. Reads only what
        was appended (a vLLM start logs hundreds of KB); a last line without its newline waits
        for the next call unless the process has ended (``complete``)."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_checked)
            new = log.read()
        end = len(new) if complete else new.rfind(b"\n") + 1
        self._log_checked += end
        return bool(self.port_taken.search(new[:end].decode(errors="replace")))

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM the server and wait up to ``timeout`` seconds: its exit status, or None if it
        still runs. Its directory and log stay until ``stop``."""
        return self._process.terminate(timeout) if self._process is not None else None

    def stop(self) -> None:
        """Stop the process (SIGTERM, SIGKILL after ``stop_grace``) and remove its directory.
        Idempotent."""
        if self._process is not None:
            self._process.stop(grace=self.stop_grace)
            self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
