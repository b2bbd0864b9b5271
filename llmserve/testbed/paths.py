"""Where the test bed keeps built binaries and per-instance state (outside any clone)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """Built binaries and Go wrapper modules, shared by every clone on the machine."""
    return Path(os.environ.get("LLMSERVE_CACHE", Path.home() / ".cache" / "llmserve"))


def state_root() -> Path:
    """One directory per running test bed (certificates, etcd data, logs, state.json)."""
    return Path(os.environ.get("LLMSERVE_STATE", cache_root() / "testbeds"))
