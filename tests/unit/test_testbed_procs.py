"""LocalServer's start on fresh ports, with a stand-in process that only logs Go's bind error (how
each real server logs it is tested with that server: tests/integration/test_triton.py and
test_prometheus.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from llmserve.testbed.procs import LocalServer, free_ports


class _StandIn(LocalServer):
    """Given a port in `taken` it logs the bind error and exits; otherwise it says "serving" and
    runs until stopped."""

    what = "the stand-in"

    def __init__(self, taken: set[int]) -> None:
        super().__init__()
        self.taken = taken
        self.picks: list[int] = []

    def _command(self, workdir: Path) -> tuple[list[str], None]:
        (self.port,) = self.pick_ports(1)
        self.picks.append(self.port)
        if self.port in self.taken:
            code = f"print('listen tcp 127.0.0.1:{self.port}: bind: address already in use')"
        else:
            code = "import time; print('serving', flush=True); time.sleep(60)"
        return [sys.executable, "-c", code], None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while "serving" not in self.log_path.read_text():
            self._raise_if_failed("before it served")
            assert time.monotonic() < deadline, "the stand-in neither served nor failed"
            time.sleep(0.05)


def test_a_start_that_lost_its_port_is_made_again_on_a_fresh_one():
    server = _StandIn(taken=set())

    def first_taken(count: int) -> list[int]:
        ports = free_ports(count)
        if not server.picks:
            server.taken.add(ports[0])
        return ports

    server.pick_ports = first_taken
    with server:
        assert len(server.picks) == 2 and server.picks[0] in server.taken
        assert server.port == server.picks[1]


def test_three_lost_starts_in_a_row_are_an_error_with_the_log():
    (port,) = free_ports(1)
    server = _StandIn(taken={port})
    server.pick_ports = lambda count: [port]
    with pytest.raises(RuntimeError, match="3 starts in a row: the stand-in lost a port") as failed:
        server.start()
    assert "bind: address already in use" in str(failed.value)
    assert server.picks == [port] * 3
    with pytest.raises(RuntimeError, match="has not been started"):  # its directory is gone
        server.log_path
