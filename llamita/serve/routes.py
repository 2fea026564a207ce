"""The routes: OpenAI's /v1 shapes, the Llama 2 articles' /predict, /health, /metrics.

Handlers validate the body, turn it into ``Request``s (``LLM.request``, ``LLM.encode_chat``), hand
them to the app's engine (``app.state``) and shape what comes back as OpenAI does, whole or as
server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.types import Receive, Scope, Send

from llamita.errors import LlamitaError
from llamita.generate import Request
from llamita.serve.engine import EngineStopped, QueueFull, Stream

MAX_N = 8  # choices per request: each takes a cache row of its own


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the body is over the limit of {max_bytes} bytes", code="request_too_large")


# -- request bodies (strict: "8" is not a number, 1.5 is not an int, true is not 1) -----------------
class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


NonEmpty = Annotated[str, Field(min_length=1)]


class Sampling(Body):
    """What every route takes to sample; OpenAI's defaults, plus top_k and repetition_penalty."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=16)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)


class StreamOptions(Body):
    include_usage: bool = False


class OpenAIBody(Sampling):
    model: str | None = None  # accepted whatever it names: this server serves one model
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatBody(OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    @model_validator(mode="after")
    def _one_max_tokens(self) -> "ChatBody":
        self.max_tokens = self.max_tokens or self.max_completion_tokens
        return self


class CompletionBody(OpenAIBody):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_N)]


class PredictBody(Sampling):
    text: str


# -- answers ------------------------------------------------------------------------------------
class Shape:
    """What differs between chat and text completions, whole and streamed."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                     "model": model}

    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": index, **body, "logprobs": None, "finish_reason": finish}

    def delta(self, index: int, text: str, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        """A streamed choice: the opening role (chat), a piece of text, or the finish (no text)."""
        if not self.chat:
            body: dict[str, Any] = {"text": text}
        elif role:
            body = {"delta": {"role": "assistant", "content": ""}}
        else:
            body = {"delta": {} if finish else {"content": text}}
        return {"index": index, **body, "logprobs": None, "finish_reason": finish}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {**self.head, "object": obj, "choices": choices, **({"usage": usage} if usage else {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompts: list[list[int]], requests: list[Request]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def until_disconnected(http: HttpRequest) -> None:
    """Returns when the client hangs up (the body has been read, so the next message says so)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def collect(stream: Stream, http: HttpRequest) -> list[tuple[str, str]] | None:
    """(text, finish_reason) per choice; None if the client left first (its rows are freed)."""
    async def gather() -> list[tuple[str, str]]:
        texts, finishes = [""] * len(stream.requests), [""] * len(stream.requests)
        async for event in stream.events():
            if event.finish == "error":
                raise ApiError(500, f"generation failed: {event.text}", type="server_error")
            texts[event.index] += event.text
            finishes[event.index] = event.finish or ""
        return list(zip(texts, finishes))

    done_task, left_task = asyncio.ensure_future(gather()), asyncio.ensure_future(until_disconnected(http))
    try:
        await asyncio.wait({done_task, left_task}, return_when=asyncio.FIRST_COMPLETED)
        return done_task.result() if done_task.done() else None
    finally:
        left_task.cancel()
        done_task.cancel()
        stream.cancel()  # a no-op once every choice has finished


async def sse(stream: Stream, shape: Shape, prompts: list[list[int]], include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice (chat), text deltas, a finish chunk per choice,
    the usage chunk if asked for, then ``[DONE]``."""
    if shape.chat:
        yield shape.chunk([shape.delta(i, "", role=True) for i in range(len(stream.requests))])
    async for event in stream.events():
        if event.finish == "error":
            yield f"data: {json.dumps(ApiError(500, event.text, type='server_error').body)}\n\n"
            return
        if event.text:
            yield shape.chunk([shape.delta(event.index, event.text)])
        if event.finish:
            yield shape.chunk([shape.delta(event.index, "", event.finish)])
    if include_usage:
        yield shape.chunk([], usage(prompts, stream.requests))
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that cancels its stream however it ends: finished (a no-op), the client
    gone mid-stream, or gone before the first byte."""

    def __init__(self, stream: Stream, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.cancel()


# -- requests for the engine ------------------------------------------------------------------------
def requests_for(http: HttpRequest, prompts: list[list[int]], body: Sampling, n: int,
                 default_max_tokens: int | None, param: str) -> list[Request]:
    """``n`` Requests per prompt, checked against the context window (seeds seed, seed+1, ...)."""
    llm, window = http.app.state.llm, http.app.state.engine.max_seq_len
    requests = []
    for ids in prompts:
        room = window - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context window is {window}",
                           param=param, code="context_length_exceeded")
        max_tokens = body.max_tokens
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens is {max_tokens}, but the prompt's {len(ids)} tokens leave room "
                           f"for {room} in the context window of {window}",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = max_tokens or min(default_max_tokens or room, room)
        for j in range(n):
            try:
                requests.append(llm.request(
                    ids, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                    top_k=body.top_k, repetition_penalty=body.repetition_penalty, stop=body.stop or [],
                    seed=None if body.seed is None else body.seed + j))
            except LlamitaError as e:
                raise ApiError(400, str(e), param=param) from None
    return requests


def submit(http: HttpRequest, requests: list[Request]) -> Stream:
    try:
        return http.app.state.engine.submit(requests)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}; retry later", type="requests",
                       code="rate_limit_exceeded") from None
    except EngineStopped as e:
        raise ApiError(503, str(e), type="server_error", code="unavailable") from None


async def answer(http: HttpRequest, body: OpenAIBody, chat: bool, prompts: list[list[int]],
                 default_max_tokens: int | None, param: str) -> Response:
    shape = Shape(chat, http.app.state.model_name)
    requests = requests_for(http, prompts, body, body.n, default_max_tokens, param)
    stream = submit(http, requests)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(stream, sse(stream, shape, prompts, include_usage))
    results = await collect(stream, http)
    if results is None:
        return Response(status_code=499)  # nobody is there to read it
    choices = [shape.choice(i, text, finish) for i, (text, finish) in enumerate(results)]
    return JSONResponse({**shape.head, "choices": choices, "usage": usage(prompts, requests)})


# -- routes -----------------------------------------------------------------------------------------
router = APIRouter()


def model_card(http: HttpRequest) -> dict[str, Any]:
    state = http.app.state
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "llamita"}


@router.get("/v1/models")
async def models(http: HttpRequest) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(http)]}


@router.get("/v1/models/{name:path}")
async def model(http: HttpRequest, name: str) -> dict[str, Any]:
    served = http.app.state.model_name
    if name != served:
        raise ApiError(404, f"the model {name!r} does not exist (this server serves {served!r})",
                       param="model", code="model_not_found")
    return model_card(http)


@router.post("/v1/chat/completions")
async def chat_completions(http: HttpRequest, body: ChatBody) -> Response:
    try:
        prompt = http.app.state.llm.encode_chat([m.as_dict() for m in body.messages])
    except LlamitaError as e:
        raise ApiError(400, str(e), param="messages") from None
    return await answer(http, body, True, [prompt], None, "messages")


@router.post("/v1/completions")
async def completions(http: HttpRequest, body: CompletionBody) -> Response:
    llm = http.app.state.llm
    prompts = [llm.encode(p) for p in ([body.prompt] if isinstance(body.prompt, str) else body.prompt)]
    return await answer(http, body, False, prompts, 16, "prompt")  # 16: OpenAI's default


@router.post("/predict")
async def predict(http: HttpRequest, body: PredictBody) -> Response:
    """The Llama 2 articles' Flask endpoint: ``{"text"}`` in, its continuation as ``{"generation"}``."""
    prompt = http.app.state.llm.encode(body.text)
    results = await collect(submit(http, requests_for(http, [prompt], body, 1, 256, "text")), http)
    return JSONResponse({"generation": results[0][0]}) if results else Response(status_code=499)


@router.get("/health")
async def health(http: HttpRequest) -> Response:
    if not http.app.state.engine.alive:
        return ApiError(503, "the engine is not running", type="server_error", code="unavailable").response()
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(http: HttpRequest) -> PlainTextResponse:
    return PlainTextResponse(http.app.state.engine.prometheus(), media_type="text/plain; version=0.0.4")
