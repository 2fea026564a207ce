"""The server for one model: the FastAPI app, its middleware, and bad input answered as OpenAI does.

Bad input of any kind is answered with a 4xx and OpenAI's error object, never a 500. With API keys,
every route but ``/health`` and the chat page asks for one. SIGTERM drains the engine (running
streams finish, or end cleanly after ``shutdown_timeout``) and exits 0. The routes live in
``routes.py``, the batching in ``engine.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamita import parallel
from llamita.assets import DEFAULT_MODEL_NAME
from llamita.errors import LlamitaError
from llamita.llm import LLM
from llamita.serve.engine import Connections, Engine, EngineConfig
from llamita.serve.routes import ApiError, router, too_large

if TYPE_CHECKING:
    import uvicorn

MAX_BODY_BYTES = 1 << 20
API_KEY_ENV = "LLAMITA_API_KEY"  # keys from the environment (comma-separated), beside --api-key
PUBLIC_PATHS = frozenset({"/health", "/"})  # a liveness probe, and the chat page (it holds no data)
_UNION_TAG = re.compile(r"^(str|int|float|bool)$|[-\[]")  # pydantic's names for union branches in an error's loc


class BodyLimit:
    """413 for a body over ``max_bytes``, whether its Content-Length says so or it streams past it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(self.max_bytes).response()(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # an HTTPException, so that FastAPI's body reader lets it through
                raise HTTPException(413)
            return message

        await self.app(scope, limited, send)


class ApiKeys:
    """401 unless the request carries ``Authorization: Bearer KEY`` with one of ``keys`` (compared in
    constant time, with every key), for every path but ``PUBLIC_PATHS``."""

    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS and not self.allowed(scope):
            error = ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
            response = error.response()
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def allowed(self, scope: Scope) -> bool:
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        given_bytes = given.strip().encode("latin-1")  # as the header's bytes were decoded
        matches = [hmac.compare_digest(given_bytes, key) for key in self.keys]  # all compared: no early exit
        return scheme.lower() == "bearer" and any(matches)


def api_keys(given: list[str] | None) -> list[str]:
    """The keys: those given, and those in $LLAMITA_API_KEY (comma-separated); each non-empty."""
    keys = list(given or []) + [k for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    for key in keys:
        if not key or key != key.strip() or not (key.isascii() and key.isprintable()):
            raise LlamitaError("an API key must be printable ASCII, non-empty, without surrounding spaces")
    return keys


def create_app(llm: LLM, *, model_name: str = DEFAULT_MODEL_NAME, config: EngineConfig | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, api_key: list[str] | None = None, parse_special: bool = False,
               **engine_options) -> FastAPI:
    """The server for one model; its engine thread runs while the app's lifespan does.
    ``api_key``: keys of which requests must carry one (with $LLAMITA_API_KEY's). ``parse_special``:
    control tokens written in text prompts (/v1/completions, /predict) become their ids for every
    request, as a body's ``"parse_special": true`` asks for one; chat messages never do.
    ``engine_options``: EngineConfig's fields, when no ``config`` is given."""
    keys = api_keys(api_key)
    engine = Engine(llm.model, config or EngineConfig(**engine_options), tp=parallel.active(), drafter=llm.drafter,
                    draft_tokens=llm.draft_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="llamita-tokenize")
        engine.start()
        yield
        engine.stop()
        app.state.tokenizing.shutdown(cancel_futures=True)

    app = FastAPI(title="llamita", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if keys:
        app.add_middleware(ApiKeys, keys=keys)  # added last: it runs first
    app.state.api_keys = bool(keys)
    app.state.llm, app.state.engine, app.state.model_name, app.state.started = llm, engine, model_name, int(time.time())
    app.state.parse_special = parse_special
    # A prompt of more characters cannot fit in the window: refused before it is tokenized (routes.check_size).
    app.state.max_prompt_chars = engine.max_seq_len * llm.tokenizer.longest_token_chars
    add_error_handlers(app, max_body_bytes)
    app.include_router(router)
    return app


def add_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """Every failure as an OpenAI error object."""

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, e: RequestValidationError) -> JSONResponse:
        error = max(e.errors(), key=lambda err: len(err["loc"]))  # the deepest: the union branch that got furthest
        if error["type"] == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}").response()
        path = ".".join(str(part) for part in error["loc"][1:] if not _UNION_TAG.search(str(part)))  # drop "body"
        if not path:
            return ApiError(400, f"the body must be a JSON object sent as application/json ({error['msg']})").response()
        code = "missing_required_parameter" if error["type"] == "missing" else "invalid_value"
        return ApiError(400, f"{path}: {error['msg']}", param=path, code=code).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: HttpRequest, e: HTTPException) -> JSONResponse:
        if e.status_code == 413:
            return too_large(max_body_bytes).response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return ApiError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal(_: HttpRequest, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}", type="server_error").response()


def server_config(app: ASGIApp, host: str, port: int, limits: Connections | None = None) -> uvicorn.Config:
    """uvicorn's configuration for ``app``, with ``limits`` on its connections (default: Connections())."""
    import uvicorn

    limits = limits or Connections()
    config = uvicorn.Config(app, host=host, port=port, log_level="info", http=protocol_class(),
                            timeout_keep_alive=limits.idle_timeout, limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=5)  # after the engine's drain: for responses being written
    config.header_timeout = limits.header_timeout
    return config


def protocol_class() -> type:
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's headers (imported late: only
    ``serve`` needs uvicorn)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        """Closes a connection whose request's headers are not all there ``config.header_timeout``
        seconds after it opened or after its last response (however slowly they trickle in)."""

        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:  # not a pipelined request
                self.arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self.disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(self.config.header_timeout, self.transport.close)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

    return HeaderDeadline


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def graceful_server(config: uvicorn.Config, engine: Engine, timeout: float) -> uvicorn.Server:
    """uvicorn's server, whose shutdown (SIGTERM, SIGINT) first stops accepting connections and
    drains ``engine`` (``Engine.drain``: running streams get ``timeout`` seconds to finish, then end
    with finish reason "abort" and a well-formed end); a SIGTERM then exits 0, not by the signal."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # asked to stop, and stopping cleanly: not re-raised on exit
                self._captured_signals.remove(sig)

        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:
                server.close()  # no new connections while the running requests finish
            await asyncio.to_thread(engine.drain, timeout)
            await super().shutdown(sockets)

    return GracefulServer(config)


def serve(llm: LLM, *, source: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          limits: Connections | None = None, **options) -> None:
    """Serve ``llm`` until interrupted or terminated; ``options`` go to ``create_app`` (``api_key``,
    ``parse_special``, ``config``, or EngineConfig's fields); ``limits``: on its connections and its
    shutdown."""
    limits = limits or Connections()
    name = Path(source).name if source else DEFAULT_MODEL_NAME
    app = create_app(llm, model_name=name, **options)
    if not app.state.api_keys and not is_loopback(host):
        print(f"llamita: warning: serving on {host} without an API key: anyone who can reach port {port} can use "
              f"this server (give --api-key KEY, or set ${API_KEY_ENV})", file=sys.stderr)
    graceful_server(server_config(app, host, port, limits), app.state.engine, limits.shutdown_timeout).run()
