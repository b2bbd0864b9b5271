"""The tritonserver argv shared by the operator's pod template and local runs."""

import pytest

from llmserve.operator.tritoncmd import tritonserver_command


def test_pod_defaults_serve_named_models_explicitly_on_standard_ports():
    argv = tritonserver_command("/models", ["chat", "embed"])
    assert argv[0] == "tritonserver"
    assert argv[1:5] == [
        "--model-repository=/models",
        "--model-control-mode=explicit",
        "--load-model=chat",
        "--load-model=embed",
    ]
    for flag in (
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--allow-metrics=true",
        "--http-address=0.0.0.0",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
        "--metrics-interval-ms=1000",
        "--metrics-config=summary_latencies=true",
        "--log-verbose=0",
    ):
        assert flag in argv
    assert not [a for a in argv if a.startswith(("--backend-directory", "--backend-config"))]


def test_local_run_overrides():
    argv = tritonserver_command(
        "/tmp/repo",
        ["add_sub"],
        executable="/opt/bin/tritonserver",
        address="127.0.0.1",
        http_port=18000,
        grpc_port=18001,
        metrics_port=18002,
        log_verbose=1,
        backend_directory="/cache/backends",
        backend_config={"python": {"shm-region-prefix-name": "x-", "shm-default-byte-size": "2097152"}},
    )
    assert argv[0] == "/opt/bin/tritonserver"
    assert "--grpc-address=127.0.0.1" in argv and "--metrics-address=127.0.0.1" in argv
    assert "--http-port=18000" in argv and "--log-verbose=1" in argv
    assert argv[-3:] == [
        "--backend-directory=/cache/backends",
        "--backend-config=python,shm-region-prefix-name=x-",
        "--backend-config=python,shm-default-byte-size=2097152",
    ]


@pytest.mark.parametrize(
    ("models", "kwargs", "message"),
    [
        ([], {}, "at least one model"),
        (["*"], {}, "invalid model name"),
        (["a,b"], {}, "invalid model name"),
        (["chat", "chat"], {}, "repeat"),
        (["chat"], {"grpc_port": 8000}, "must differ"),
        (["chat"], {"metrics_port": 0}, "not a TCP port"),
        (["chat"], {"metrics_interval_ms": 0}, "positive"),
    ],
)
def test_refuses_what_triton_would_only_reject_in_the_pod(models, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tritonserver_command("/models", models, **kwargs)
