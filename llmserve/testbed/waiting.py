"""Waiting for a condition on real components, with a message that says what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.5,
         explain: Callable[[], str] | None = None) -> T:
    """Call `probe` until it returns something truthy; TimeoutError naming `what` otherwise, with
    `explain()` (the state that did not change) appended."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f"\n{explain()}" if explain else ""))
        time.sleep(interval)
