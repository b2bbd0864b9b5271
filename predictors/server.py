"""Assemble and run the predictor: kserve's ``ModelServer`` with one ``TritonModel`` and the
OpenAI endpoints mounted on kserve's FastAPI app.

What the ``ModelServer`` brings: uvicorn with graceful shutdown on SIGTERM, the model registry,
the V2 REST endpoints (``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/<m>[/ready|/infer]``),
and ``/metrics`` from the Prometheus default registry. What is set here:

- kserve's gRPC server is off: V2 gRPC clients can talk to Triton itself on port 8001.
- ``TritonDataPlane`` replaces kserve's data plane so server readiness is Triton's.
- ``APIError`` renders as OpenAI's error object under ``/v1`` and as ``{"error": ...}`` (the V2
  protocol's shape) elsewhere, without the traceback kserve's handlers log for every 4xx.
- kserve's per-request timing line and (unless ``--access-log``) uvicorn's access line are
  silenced: the same facts are in ``/metrics``, and each line costs CPU on every request.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from fastapi import Request
from starlette.responses import Response

from .protocol import APIError, to_json

# A child of kserve's logger, so our lines share its handler, format and level.
log = logging.getLogger("kserve.llmserve")


@contextlib.contextmanager
def _argv_hidden() -> Iterator[None]:
    """Import kserve without it seeing our command line.

    ``kserve.model_server`` parses ``sys.argv`` with argparse at import time to fill its defaults,
    and argparse accepts prefixes (``--timeout`` would set kserve's ``--timeout-keep-alive``).
    """
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


async def api_error_handler(request: Request, exc: APIError) -> Response:
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    body = exc.openai_body() if request.url.path.startswith("/v1/") else exc.v2_body()
    return Response(to_json(body), status_code=exc.status, media_type="application/json", headers=exc.headers)


def serve(args: argparse.Namespace) -> None:
    """Run the predictor in the foreground until SIGTERM or SIGINT."""
    with _argv_hidden():
        from kserve import ModelServer
        from kserve import model_server as kserve_model_server

    from .metrics import Admission
    from .model import TritonDataPlane, TritonModel
    from .openai_api import OpenAIEndpoints
    from .triton import Triton

    triton = Triton(args.triton_grpc, request_timeout=args.request_timeout)
    model = TritonModel(args.model, triton, Admission(args.model, args.max_concurrency), args.max_tokens)
    server = ModelServer(http_port=args.http_port, enable_grpc=False, enable_latency_logging=False,
                         enable_docs_url=False)
    server.dataplane = TritonDataPlane(model_registry=server.registered_models)
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    if not args.access_log:
        # uvicorn skips formatting access lines when its access logger has no handlers.
        logging.getLogger("uvicorn.access").handlers.clear()
        logging.getLogger("uvicorn.access").propagate = False

    app = kserve_model_server.app
    # Included before kserve adds its V1 routes at start(), so OpenAI's /v1/models wins over
    # kserve's V1 /v1/models of the same path.
    app.include_router(OpenAIEndpoints(server.registered_models).router())
    app.add_exception_handler(APIError, api_error_handler)
    log.info("predictor for model %r on :%d, Triton gRPC at %s, at most %d concurrent requests",
             args.model, args.http_port, args.triton_grpc, args.max_concurrency)
    server.start([model])
