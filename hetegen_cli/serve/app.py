"""The ASGI app (FastAPI): OpenAI's routes over one ServedModel (docs/serve.md).

`create_app(served, options)` gives the app; `hetegen_cli.serve.server` runs it with uvicorn.
Every error is answered in OpenAI's shape with a 4xx (a 500 says "internal error" and logs the
traceback on the server, never in the response); with an API key every route but /health
needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetegen_cli.core.errors import HetegenError
from hetegen_cli.run.generate import SamplingOptions
from hetegen_cli.serve import protocol as p
from hetegen_cli.serve.metrics import Metrics
from hetegen_cli.serve.model import ServedModel, ServeOptions
from hetegen_cli.serve.worker import Job, ModelThread, Worker

log = logging.getLogger("hetegen.serve")
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")


def _error_response(err: p.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad parameter, as OpenAI's 400s do."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # drop "body" and pydantic's union-member tags ("str", "list[str]", ...) from the location
    tags = {"str", "int", "float", "bool", "list", "dict"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and str(x) not in tags and "[" not in str(x)]
    param = loc[0] if loc else None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc:
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    if first.get("type") == "missing":
        return f"missing required parameter: {param}", param
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"invalid {'.'.join(loc)}: {message}" if loc else message), param


def create_app(served: ServedModel, options: ServeOptions, thread: ModelThread) -> Any:
    """The app over `served`, whose torch work runs on `thread` (the one that loaded it). Its
    worker is created at startup, inside the server's loop."""
    metrics = Metrics()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["worker"] = app.state.worker = Worker(served, options.max_queue, metrics, thread)
        yield
        state["worker"].close()

    app = FastAPI(title="hetegen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.served = served

    def worker() -> Worker:
        return state["worker"]

    @app.exception_handler(p.ApiError)
    async def _api_error(request: Request, exc: p.ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(p.ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        routed = exc.status_code in (404, 405)
        message = f"no route {request.method} {request.url.path}" if routed else str(exc.detail)
        return _error_response(p.ApiError(exc.status_code, message, type=kind))

    @app.get("/health")
    async def health() -> dict:
        w = state.get("worker")
        return {
            "status": "ok",
            "model": served.model_id,
            "waiting": w.waiting if w else 0,
            "generating": bool(w and w._lock.locked()),
        }

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _check_model(served, model_id)
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat(body: p.ChatRequest, request: Request) -> Response:
        _check_model(served, body.model)
        ids = _chat_ids(served, body)
        job = _job(served, ids, body.token_limit, body)
        return await _answer(worker(), request, job, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        _check_model(served, body.model)
        ids = _encode(served, body.text)
        job = _job(served, ids, body.token_limit, body)
        return await _answer(worker(), request, job, body, chat=False)

    return _Guard(app, options.api_key, metrics)


class _Guard:
    """Pure ASGI middleware around the app (no BaseHTTPMiddleware, which gets in the way of
    streaming and of noticing a client that left): the API key on every route but /health,
    the request counter by route and status, and a last-resort 500 in OpenAI's shape."""

    def __init__(self, app: FastAPI, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.state = app.state  # the server reaches the worker through it

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = {"code": 500, "sent": False}

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            if self.api_key and path != "/health" and not _authorized(scope, self.api_key):
                err = p.ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                await _error_response(err)(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        except Exception:  # answered here, logged once; never a traceback in a response
            log.exception("internal error answering %s %s", scope.get("method"), path)
            if not status["sent"]:
                err = p.ApiError(500, "internal error (see the server's log)", type="server_error")
                await _error_response(err)(scope, receive, counted_send)
        finally:
            route = path if path in (*GENERATION_ROUTES, "/v1/models", "/health", "/metrics") else "other"
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()


def _authorized(scope: dict, key: str) -> bool:
    headers = dict(scope.get("headers") or [])
    header = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _model_card(served: ServedModel) -> dict:
    return {
        "id": served.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "hetegen",
        "hetegen": served.describe(),
    }


def _check_model(served: ServedModel, name: str) -> None:
    if name != served.model_id:
        raise p.ApiError(
            404,
            f"the model {name!r} is not served here; this server serves {served.model_id!r}",
            param="model",
            code="model_not_found",
        )


def _encode(served: ServedModel, text: str) -> list[int]:
    if not text:
        raise p.ApiError(400, "the prompt is empty", param="prompt")
    ids = [int(i) for i in served.tokenizer(text)["input_ids"]]
    if not ids:
        raise p.ApiError(400, "the prompt produced no tokens", param="prompt")
    return ids


def _chat_ids(served: ServedModel, body: p.ChatRequest) -> list[int]:
    if not served.has_chat_template:
        raise p.ApiError(
            400,
            f"{served.model_id}'s tokenizer has no chat template; use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise p.ApiError(400, f"invalid messages: {exc}", param="messages") from None
    try:
        ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # templates raise their own errors (e.g. roles they refuse)
        raise p.ApiError(400, f"the chat template refused the messages: {exc}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding on some versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _job(served: ServedModel, ids: list[int], limit: int | None, body: Any) -> Job:
    room = served.context - len(ids)
    if room < 1:
        raise p.ApiError(
            400,
            f"the prompt has {len(ids)} tokens; this server's context is {served.context} tokens "
            "(prompt + completion)",
            param="messages" if hasattr(body, "messages") else "prompt",
            code="context_length_exceeded",
        )
    if limit is not None and limit > room:
        raise p.ApiError(
            400,
            f"max_tokens {limit} + the prompt's {len(ids)} tokens exceed this server's context of "
            f"{served.context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    max_tokens = limit if limit is not None else min(served.default_max_tokens, room)
    sampling = SamplingOptions(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    return Job(ids, max_tokens, sampling, body.stops)


def _timings(job: Job, served: ServedModel) -> dict:
    t = job.result.timings if job.result else None
    return {
        "queue_s": job.queue_s,
        "time_to_first_token_s": job.first_text_s,
        "prefill_s": t.prefill_s if t else None,
        "prefill_tokens_per_s": t.prefill_tokens_per_s if t else None,
        "decode_tokens_per_s": t.decode_tokens_per_s if t else None,
        "total_s": time.perf_counter() - job.arrived,
        **served.describe(),
    }


_SHUTTING_DOWN = p.ApiError(
    503, "the server is shutting down; the generation was stopped", type="server_error", code="shutting_down"
)


def _cancelled(job: Job) -> bool:
    return job.result is not None and job.result.stop_reason == "cancelled"


def _sse(doc: dict | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n"


async def _answer(worker: Worker, request: Request, job: Job, body: Any, *, chat: bool) -> Response:
    served = worker.served
    running = await worker.start(job, request.is_disconnected)
    rid = p.new_id("chatcmpl" if chat else "cmpl")
    model = served.model_id
    if not body.stream:
        try:
            async for _ in running:
                pass
        except HetegenError as exc:
            raise p.ApiError(500, f"generation failed: {exc.message}", type="server_error") from None
        if _cancelled(job):
            raise _SHUTTING_DOWN
        use = p.usage(len(job.prompt_ids), len(job.result.token_ids))
        make = p.chat_response if chat else p.completion_response
        return JSONResponse(make(rid, model, job.text, job.finish_reason, use, _timings(job, served)))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        if chat:
            yield _sse(p.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
        try:
            async for piece in running:
                if chat:
                    yield _sse(p.chat_chunk(rid, model, {"content": piece}))
                else:
                    yield _sse(p.completion_chunk(rid, model, piece))
        except HetegenError as exc:  # the stream has begun: report in-band, as OpenAI does
            yield _sse(p.ApiError(500, f"generation failed: {exc.message}", type="server_error").body())
            return
        if _cancelled(job):
            yield _sse(_SHUTTING_DOWN.body())
            return
        yield _sse(
            p.chat_chunk(rid, model, {}, job.finish_reason)
            if chat
            else p.completion_chunk(rid, model, "", job.finish_reason)
        )
        if include_usage:
            use = p.usage(len(job.prompt_ids), len(job.result.token_ids))
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(p.usage_chunk(rid, model, obj, use, _timings(job, served)))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
