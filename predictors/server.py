"""Assemble and run the predictor: kserve's ``ModelServer`` with one ``TritonModel`` and the
OpenAI endpoints mounted on kserve's FastAPI app.

What the ``ModelServer`` brings: uvicorn with graceful shutdown on SIGTERM, the model registry,
the V2 REST endpoints (``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/<m>[/ready|/infer]``),
and ``/metrics`` from the Prometheus default registry. What is set here:

- kserve's gRPC server is off: V2 gRPC clients can talk to Triton itself on port 8001.
- ``TritonDataPlane`` replaces kserve's data plane so server readiness is Triton's.
- ``APIError`` renders as OpenAI's error object under ``/v1`` and as ``{"error": ...}`` (the V2
  protocol's shape) elsewhere, without the traceback kserve's handlers log for every 4xx.
- kserve's per-request timing line (and the TimingMiddleware that measures it) and, unless
  ``--access-log``, uvicorn's access line are off: the same facts are in ``/metrics``, and each
  costs CPU on every request.
- The OpenAI routes are served on a lean path (``LeanV1``): an ASGI app in front of kserve's
  FastAPI app sends ``/v1`` requests it knows straight to their handler, skipping the middleware
  stack (Starlette's error and exception middleware, kserve's timing middleware, which matches
  every route again to name the request, FastAPI's routing and dependency solving), about a
  quarter of the predictor's CPU per request. Everything else (V2, ``/metrics``, unknown paths
  and methods, lifespan) goes to the FastAPI app as before; the ``/v1`` routes stay registered
  there too, so a request the lean path does not take is answered as before.
- The event loop is uvloop (a dependency of kserve's ``uvicorn[standard]``): kserve runs uvicorn
  inside ``asyncio.run``, so uvicorn's own ``loop="auto"`` never applies.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

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


Handler = Callable[[Request], Awaitable[Response]]


class LeanV1:
    """The ASGI app uvicorn runs: the OpenAI routes directly, everything else through ``app``.

    ``routes`` maps (method, path) to a handler taking the ``Request``; ``models_handler``
    answers ``GET /v1/models/<id>``. Errors are rendered as the FastAPI app renders them:
    ``APIError`` by ``api_error_handler``, anything else by kserve's generic 500 handler.
    """

    def __init__(self, app: Any, routes: dict[tuple[str, str], Handler],
                 model_handler: Callable[[str], Awaitable[Response]]) -> None:
        self.app = app
        self.routes = routes
        self.model_handler = model_handler

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/v1/"):
                handler = self.routes.get((scope["method"], path))
                if handler is not None:
                    return await self._serve(handler, scope, receive, send)
                if scope["method"] == "GET" and path.startswith("/v1/models/"):
                    model_id = path[len("/v1/models/"):]
                    if model_id and "/" not in model_id:
                        return await self._serve(lambda _: self.model_handler(model_id), scope, receive, send)
        await self.app(scope, receive, send)

    async def _serve(self, handler: Handler, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except APIError as exc:
            response = await api_error_handler(request, exc)
        except Exception as exc:
            from kserve.errors import generic_exception_handler
            response = await generic_exception_handler(request, exc)
        await response(scope, receive, send)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    import asyncio
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # kserve's ModelServer.start() asks for the current loop before asyncio.run() (to set its
    # exception handler and executor); uvloop's policy, unlike asyncio's, does not create one then.
    asyncio.set_event_loop(asyncio.new_event_loop())


def serve(args: argparse.Namespace) -> None:
    """Run the predictor in the foreground until SIGTERM or SIGINT."""
    with _argv_hidden():
        from kserve import ModelServer
        from kserve import model_server as kserve_model_server
        from timing_asgi import TimingMiddleware

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
    endpoints = OpenAIEndpoints(server.registered_models)
    # Included before kserve adds its V1 routes at start(), so OpenAI's /v1/models wins over
    # kserve's V1 /v1/models of the same path.
    app.include_router(endpoints.router())
    app.add_exception_handler(APIError, api_error_handler)
    lean = LeanV1(app, endpoints.lean_routes(), endpoints.model)

    class RESTServer(kserve_model_server.RESTServer):
        """kserve's REST server, serving ``LeanV1`` in front of the FastAPI app it assembles."""

        def create_application(self) -> None:
            super().create_application()
            # kserve's TimingMiddleware only feeds the kserve.trace log line silenced above, yet
            # on every request it matches the path against every route (to name it) and reads
            # the process CPU time twice. Starlette builds the middleware stack on the first
            # request, so dropping it here takes it off the V2 path too.
            app.user_middleware[:] = [m for m in app.user_middleware if m.cls is not TimingMiddleware]
            self.config.app = lean

    kserve_model_server.RESTServer = RESTServer
    _use_uvloop()
    log.info("predictor for model %r on :%d, Triton gRPC at %s, at most %d concurrent requests",
             args.model, args.http_port, args.triton_grpc, args.max_concurrency)
    server.start([model])
