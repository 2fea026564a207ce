"""The routes: OpenAI's /v1 shapes, the Llama 2 articles' /predict, /health, /metrics.

Handlers validate the body, turn it into ``Request``s (``LLM.request``, ``LLM.encode_chat``), hand
them to the app's engine (``app.state``) and shape what comes back as OpenAI does, whole or as
server-sent events. /v1/completions also takes token ids and answers OpenAI's legacy ``logprobs``
and ``echo``, as lm-evaluation-harness's ``local-completions`` model sends and reads them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, AsyncIterator, Callable, Literal, TypeVar, Union

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from starlette.types import Receive, Scope, Send

from llamita.constrain import ANY_OBJECT, SchemaError
from llamita.errors import LlamitaError
from llamita.generate import Request
from llamita.llm import LLM
from llamita.logprobs import Entry, Logprobs
from llamita.sampling import MAX_STOP_CHARS, MAX_STOPS, PENALTY_RANGE
from llamita.serve.engine import EngineStopped, QueueFull, Stream
from llamita.tokenizer import Tokenizer, surrogate_error, unpaired_surrogate

MAX_N = 8  # choices per request: each takes a cache row of its own
MAX_LOGPROBS = 20  # alternatives per token (OpenAI allows 5, vLLM 20)
T = TypeVar("T")


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


def unicode_only(text: str) -> str:
    """Refuses unpaired surrogates (``"\\ud800"`` is valid JSON but not Unicode): a 400, not a
    tokenizer's failure."""
    if (at := unpaired_surrogate(text)) is not None:
        raise ValueError(surrogate_error(text, at))
    return text


Text = Annotated[str, AfterValidator(unicode_only)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class Sampling(Body):
    """What every route takes to sample; OpenAI's defaults, plus top_k and repetition_penalty."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaSpec(Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {}: any JSON value
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(Body):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON that a schema accepts."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema: {"name", "schema"}')
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow; None for free text."""
        if self.type == "json_schema":
            return self.json_schema.schema_
        return ANY_OBJECT if self.type == "json_object" else None


class OpenAIBody(Sampling):
    model: str | None = None  # accepted whatever it names: this server serves one model
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema ``response_format`` asks the output to follow; None for free text."""
        return self.response_format.output_schema() if self.response_format else None


class TextPart(Body):
    type: Literal["text"]
    text: Text


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

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


def prompt_form(value: Any) -> str:
    """Which of OpenAI's prompt forms a body holds, told by its first element, so that an error
    names the element at fault. The tags are pydantic's own names for union branches, which
    error paths leave out (``app._UNION_TAG``)."""
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, str):
        return "list[str]"
    if isinstance(first, list):
        return "list[list[int]]"
    return "list[int]" if isinstance(value, list) else "str"


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]  # below the vocabulary: checked later
Prompt = Annotated[Union[Annotated[Text, Tag("str")],
                         Annotated[list[Text], Field(min_length=1, max_length=MAX_N), Tag("list[str]")],
                         Annotated[TokenIds, Tag("list[int]")],
                         Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_N), Tag("list[list[int]]")]],
                   Discriminator(prompt_form)]


class CompletionBody(OpenAIBody):
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=0)  # 0: the prompt alone, to score it (with echo and logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    parse_special: bool = False  # control tokens written in a text prompt become their ids (else: text)


class PredictBody(Sampling):
    text: Text
    parse_special: bool = False


# -- answers ------------------------------------------------------------------------------------
def token_texts(tokenizer: Tokenizer, before: int | None, tokens: list[int]) -> list[str]:
    """Each token's text where it stands, after ``before`` (decoded alone, a SentencePiece piece
    would lose its leading space)."""
    if before is None:
        return [tokenizer.decode([t]) for t in tokens]
    head = len(tokenizer.decode([before]))
    return [tokenizer.decode([before, t])[head:] for t in tokens]


def legacy_logprobs(tokenizer: Tokenizer, entries: list[Entry], before: int | None, offset: int) -> dict[str, list]:
    """OpenAI's legacy ``logprobs`` object: each token's text, its log-probability, the most likely
    tokens there ({text: logprob}, best first, the token itself added as OpenAI's "logprobs + 1";
    a text two tokens share keeps the higher) and where its text starts (from ``offset``)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        alternatives = (e.top or []) + [(e.token, e.logprob)]
        *texts, text = token_texts(tokenizer, before, [t for t, _ in alternatives])
        top: dict[str, float] = {}
        for key, (_, logprob) in zip(texts + [text], alternatives):
            top.setdefault(key, logprob)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(None if e.top is None else top)
        out["text_offset"].append(offset)
        offset, before = offset + len(text), e.token
    return out


@dataclass
class Scoring:
    """What a text completion adds to its choices: the prompt's text in front (``echo``) and the
    ``logprobs`` object, over the prompt's tokens too with ``echo`` (text offsets count from the
    prompt's start either way, as OpenAI's do)."""

    tokenizer: Tokenizer
    prompts: list[str]  # each choice's prompt, as text
    echo: bool

    def text(self, index: int, text: str) -> str:
        return self.prompts[index] + text if self.echo else text

    def logprobs(self, index: int, request: Request) -> dict[str, list] | None:
        if request.logprobs is None:
            return None
        before, offset = (None, 0) if self.echo else (request.prompt_ids[-1], len(self.prompts[index]))
        return legacy_logprobs(self.tokenizer, request.logprobs.entries, before, offset)


class Shape:
    """What differs between chat and text completions, whole and streamed."""

    def __init__(self, chat: bool, model: str, scoring: Scoring | None = None):
        self.chat, self.scoring = chat, scoring
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                     "model": model}

    def choice(self, index: int, text: str, finish: str | None, request: Request) -> dict[str, Any]:
        logprobs = None
        if self.scoring is not None:
            text, logprobs = self.scoring.text(index, text), self.scoring.logprobs(index, request)
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish}

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
                 default_max_tokens: int | None, param: str, logprobs: int | None = None,
                 echo: bool = False, json_schema: dict[str, Any] | None = None) -> list[Request]:
    """``n`` Requests per prompt, checked against the context window (seeds seed, seed+1, ...);
    ``logprobs``: alternatives per token to report, over the prompt too with ``echo``;
    ``json_schema``: what JSON the output must be (``response_format``)."""
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
        if max_tokens is None:
            max_tokens = min(default_max_tokens or room, room)
        for j in range(n):
            try:
                requests.append(llm.request(
                    ids, logprobs=None if logprobs is None else Logprobs(logprobs, prompt=echo),
                    prompt_only=max_tokens == 0, max_new_tokens=max(max_tokens, 1),
                    temperature=body.temperature, top_p=body.top_p,
                    top_k=body.top_k, repetition_penalty=body.repetition_penalty, stop=body.stop or [],
                    seed=None if body.seed is None else body.seed + j, json_schema=json_schema))
            except SchemaError as e:
                raise ApiError(400, f"response_format.json_schema.schema: {e.reason}", param="response_format",
                               code="invalid_value") from None
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


async def answer(http: HttpRequest, body: OpenAIBody, shape: Shape, prompts: list[list[int]],
                 requests: list[Request]) -> Response:
    stream = submit(http, requests)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(stream, sse(stream, shape, prompts, include_usage))
    results = await collect(stream, http)
    if results is None:
        return Response(status_code=499)  # nobody is there to read it
    choices = [shape.choice(i, text, finish, r) for i, ((text, finish), r) in enumerate(zip(results, requests))]
    return JSONResponse({**shape.head, "choices": choices, "usage": usage(prompts, requests)})


# -- routes -----------------------------------------------------------------------------------------
router = APIRouter()


def model_card(http: HttpRequest) -> dict[str, Any]:
    """OpenAI's model object, with the context window per request as vLLM names it."""
    state = http.app.state
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "llamita",
            "max_model_len": state.engine.max_seq_len}


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


# -- tokenizing: bounded first, then off the event loop ------------------------------------------
def check_size(http: HttpRequest, size: int, param: str, unit: str = "characters") -> None:
    """Refuses a prompt that cannot fit in the context window before any work on it: tokenizing
    costs time in proportion to the text (a megabyte held the event loop for a second). ``size``:
    its characters, or its tokens when given as ids."""
    window = http.app.state.engine.max_seq_len
    limit = http.app.state.max_prompt_chars if unit == "characters" else window
    if size > limit:
        raise ApiError(400, f"the prompt has {size} {unit}, more than the context window of {window} tokens can hold "
                       f"(at most {limit})", param=param, code="context_length_exceeded")


async def off_loop(http: HttpRequest, work: Callable[[], T]) -> T:
    """``work()`` (tokenizing) in the app's tokenizer thread, so that the event loop keeps serving
    streams meanwhile; one thread, so that tokenizing requests queue rather than crowd the CPU."""
    return await asyncio.get_running_loop().run_in_executor(http.app.state.tokenizing, work)


@router.post("/v1/chat/completions")
async def chat_completions(http: HttpRequest, body: ChatBody) -> Response:
    messages = [m.as_dict() for m in body.messages]
    check_size(http, sum(len(m["content"]) for m in messages), "messages")
    try:
        prompt = await off_loop(http, lambda: http.app.state.llm.encode_chat(messages))
    except LlamitaError as e:
        raise ApiError(400, str(e), param="messages") from None
    # off the loop too: a grammar's first use builds llguidance's view of the vocabulary (most of a second)
    requests = await off_loop(http, lambda: requests_for(http, [prompt], body, body.n, None, "messages",
                                                         json_schema=body.output_schema()))
    return await answer(http, body, Shape(True, http.app.state.model_name), [prompt], requests)


def completion_prompts(llm: LLM, prompts: list[str] | list[list[int]],
                       special: bool = False) -> tuple[list[str], list[list[int]]]:
    """Each prompt as text (as given, or decoded) and as token ids (encoded, or as given: checked
    against the vocabulary, since an id past it would fail inside the model)."""
    texts, ids = [], []
    for p in prompts:
        if isinstance(p, str):
            texts.append(p)
            ids.append(llm.encode(p, special))
            continue
        check_ids(llm, p, "prompt")
        texts.append(llm.tokenizer.decode(p))
        ids.append(p)
    return texts, ids


def check_ids(llm: LLM, ids: list[int], param: str) -> None:
    """Token ids the model and tokenizer both know (an id past them fails deep inside)."""
    vocab = min(llm.tokenizer.vocab_size, llm.model.config.vocab_size)
    if ids and max(ids) >= vocab:
        raise ApiError(400, f"token id {max(ids)} is out of range: the vocabulary has {vocab} tokens (ids 0 to "
                       f"{vocab - 1})", param=param, code="invalid_value")


@router.post("/v1/completions")
async def completions(http: HttpRequest, body: CompletionBody) -> Response:
    if body.stream and (body.echo or body.logprobs is not None):
        raise ApiError(400, f"{'echo' if body.echo else 'logprobs'} is answered whole, not streamed: ask without "
                       "stream", param="echo" if body.echo else "logprobs", code="invalid_value")
    llm = http.app.state.llm
    given = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    for p in given:
        check_size(http, len(p), "prompt", "characters" if isinstance(p, str) else "tokens")
    special = body.parse_special or http.app.state.parse_special
    texts, prompts = await off_loop(http, lambda: completion_prompts(llm, given, special))
    requests = await off_loop(http, lambda: requests_for(http, prompts, body, body.n, 16, "prompt",  # 16: OpenAI's
                                                         body.logprobs, body.echo, json_schema=body.output_schema()))
    scoring = Scoring(llm.tokenizer, [t for t in texts for _ in range(body.n)], body.echo)
    return await answer(http, body, Shape(False, http.app.state.model_name, scoring), prompts, requests)


@router.post("/predict")
async def predict(http: HttpRequest, body: PredictBody) -> Response:
    """The Llama 2 articles' Flask endpoint: ``{"text"}`` in, its continuation as ``{"generation"}``."""
    check_size(http, len(body.text), "text")
    special = body.parse_special or http.app.state.parse_special
    prompt = await off_loop(http, lambda: http.app.state.llm.encode(body.text, special))
    results = await collect(submit(http, requests_for(http, [prompt], body, 1, 256, "text")), http)
    return JSONResponse({"generation": results[0][0]}) if results else Response(status_code=499)


class TokenizeBody(Body):
    content: Text
    add_special: bool = False  # BOS first, where the model's prompts start with it
    parse_special: bool = False  # control-token text (``<s>``, ``<|im_start|>``) becomes those tokens
    with_pieces: bool = False


class DetokenizeBody(Body):
    tokens: list[Annotated[int, Field(ge=0)]]


@router.post("/tokenize")
async def tokenize(http: HttpRequest, body: TokenizeBody) -> dict[str, Any]:
    """llama.cpp's /tokenize: ``{"tokens": [ids]}``, or ``[{"id", "piece"}]`` with ``with_pieces``.
    Plain text by default: llama.cpp parses control tokens unless told not to; here text stays text
    unless ``parse_special`` asks."""
    check_size(http, len(body.content), "content")
    tok = http.app.state.llm.tokenizer
    ids = await off_loop(http, lambda: tok.encode(body.content, bos=body.add_special and tok.add_bos,
                                                  special=body.parse_special or http.app.state.parse_special))
    if not body.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": i, "piece": piece_of(tok.token_bytes[i])} for i in ids]}


def piece_of(token: bytes) -> str | list[int]:
    """llama.cpp's piece: the token's text, or its bytes when they are not whole UTF-8 (half a character)."""
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return list(token)


@router.post("/detokenize")
async def detokenize(http: HttpRequest, body: DetokenizeBody) -> dict[str, Any]:
    """llama.cpp's /detokenize: ``{"content": text}`` (control tokens written as their text)."""
    llm = http.app.state.llm
    check_ids(llm, body.tokens, "tokens")
    return {"content": llm.tokenizer.decode(body.tokens)}


@router.get("/", include_in_schema=False)
async def chat_page() -> Response:
    """The chat page (static/chat.html): public, as /health is, since it holds no data; the API
    calls it makes carry the key typed into it."""
    page = resources.files("llamita.serve").joinpath("static/chat.html").read_bytes()
    return Response(page, media_type="text/html; charset=utf-8")


@router.get("/health")
async def health(http: HttpRequest) -> Response:
    engine = http.app.state.engine
    if not engine.serving:
        message = "the engine is not running" if not engine.alive else "the server is shutting down"
        return ApiError(503, message, type="server_error", code="unavailable").response()
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(http: HttpRequest) -> PlainTextResponse:
    return PlainTextResponse(http.app.state.engine.prometheus(), media_type="text/plain; version=0.0.4")
