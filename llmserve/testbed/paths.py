"""Where the test bed keeps per-instance state (outside any clone; built binaries: `cache_root`)."""

import os
from pathlib import Path

from llmserve.environments import cache_root


def state_root() -> Path:
    """One directory per running test bed (certificates, etcd data, logs, state.json)."""
    return Path(os.environ.get("LLMSERVE_STATE", cache_root() / "testbeds"))
