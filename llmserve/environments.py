"""Where llmserve keeps what it installs outside a clone: the cache root, and the separate Python
environments of the engines (vLLM, ONNX Runtime) and of the compression tools (llmcompressor).

The build tool runs vLLM and llmcompressor in those environments, not in its own: their pinned
torch and transformers would clash with the CLI's, and the operator's image must stay small.
`hack/setup.sh` (`llmserve testbed engine-env ENGINE`) makes them; the image of a build or
compression Job brings its own and points at it with the override variables.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    """Built binaries, engine environments and cached models, shared by every clone on the machine."""
    return Path(os.environ.get("LLMSERVE_CACHE", Path.home() / ".cache" / "llmserve"))


def engine_env(engine: str) -> Path:
    """The environment `engine`'s models run in (`vllm`, `onnxruntime`) or the compression tools
    (`compress`)."""
    return cache_root() / f"engine-{engine}"


def env_python(engine: str, override_var: str) -> Path:
    """`engine`'s environment interpreter: the path in $override_var if set, else `engine_env`'s."""
    return Path(os.environ.get(override_var) or engine_env(engine) / "bin" / "python")
