"""`llmserve predictor`: the OpenAI / V2 predictor in front of a Triton server.

The operator runs exactly this command as the `predictor` sidecar of every model-version pod
(`llmserve.operator.render.predictor_container`), next to `tritonserver` on localhost:

    llmserve predictor --triton-grpc localhost:8001 --http-port 8080 --model <name>

kserve and tritonclient are imported inside the command, so the rest of the CLI stays fast and
works without the `predictor` extra.
"""

from __future__ import annotations

import argparse

from ..argtypes import positive_float, positive_int, tcp_port
from ..cli import CommandError

DEFAULT_HTTP_PORT = 8080
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_MAX_TOKENS = 2048
DEFAULT_REQUEST_TIMEOUT = 600.0


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predictor", help="serve OpenAI-compatible and V2 APIs in front of a Triton server",
        description="A KServe ModelServer that serves /v1/completions, /v1/chat/completions, /v1/embeddings, "
                    "/v1/models and the V2 /v2/... API for one Triton model, talking to Triton over gRPC.")
    parser.add_argument("--triton-grpc", required=True, metavar="HOST:PORT",
                        help="Triton's gRPC endpoint (in a pod: localhost:8001)")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="the Triton model to serve; also its model id in the OpenAI API")
    parser.add_argument("--http-port", type=tcp_port, default=DEFAULT_HTTP_PORT, metavar="PORT",
                        help=f"HTTP port, on all interfaces (default {DEFAULT_HTTP_PORT})")
    parser.add_argument("--max-concurrency", type=positive_int, default=DEFAULT_MAX_CONCURRENCY, metavar="N",
                        help="requests served at once; more are refused with 429 "
                             f"(default {DEFAULT_MAX_CONCURRENCY})")
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, metavar="N",
                        help="the most completion tokens a request may ask for, and the budget of chat requests "
                             f"that name none (default {DEFAULT_MAX_TOKENS}; less when the model's config declares "
                             "a smaller context_length)")
    parser.add_argument("--request-timeout", type=positive_float, default=DEFAULT_REQUEST_TIMEOUT,
                        metavar="SECONDS",
                        help=f"deadline of each Triton call, whole streams included (default {DEFAULT_REQUEST_TIMEOUT:g})")
    parser.add_argument("--access-log", action="store_true",
                        help="log one line per request (off: /metrics counts requests by status)")
    parser.set_defaults(func=_predictor)


def predictor_command(triton_grpc: str, model: str, *, http_port: int = DEFAULT_HTTP_PORT,
                      executable: str = "llmserve", **flags: bool | int | float) -> list[str]:
    """The argv of `llmserve predictor`; ``flags`` are optional flags by their dest name
    (``max_concurrency=8`` -> ``--max-concurrency 8``, ``access_log=True`` -> ``--access-log``)."""
    argv = [executable, "predictor", "--triton-grpc", triton_grpc, "--http-port", str(http_port), "--model", model]
    for name, value in flags.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def _predictor(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        raise CommandError(f"the predictor needs the 'predictor' extra ({exc}); "
                           "install it with: pip install 'llmserve[predictor]'") from None
    serve(args)
    return 0

