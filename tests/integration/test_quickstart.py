"""The README's main command, end to end: `llmserve quickstart` on its own test bed."""

import os
import subprocess
import sys

import pytest

from llmserve.testbed.paths import state_root

pytestmark = [pytest.mark.cluster, pytest.mark.triton, pytest.mark.slow]


def test_quickstart_serves_a_chat_completion_through_the_operator_chosen_version():
    name = f"pytest-quickstart-{os.getpid()}"
    result = subprocess.run(
        [sys.executable, "-m", "llmserve", "quickstart", "--model", "tiny", "--name", name,
         "--service", "qs", "--down"],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr
    for milestone in ("installing the Helm chart", "starting the operator", "applying LLMService qs",
                      "running the pod's init container locally: llmserve pull",
                      "starting tritonserver", "starting the predictor sidecar", "done in"):
        assert milestone in log, f"missing step {milestone!r}:\n{log[-3000:]}"
    assert result.stdout.strip(), "the chat completion came back empty"
    assert not (state_root() / name).exists(), "--down left the test bed behind"
