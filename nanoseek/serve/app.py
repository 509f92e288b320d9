"""`nanoseek serve`: an OpenAI-compatible API and the web chat, over one engine.

Routes: `/v1/models`, `/v1/chat/completions` (stream or not), `/v1/completions`, `/health`,
and the web chat at `/` (static files, manifest, service worker, icons). The model's
`<think>...</think>` goes to `reasoning_content` (`delta.reasoning_content` when streaming),
the rest to `content`, as DeepSeek's API does.

Every error is OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, with its
status: 400 bad request, 401 bad or missing key, 404 unknown model or route, 413 body too
large, 429 queue full. Unknown request fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek import __version__
from nanoseek.data.tokenizer import TokenizerError
from nanoseek.infer.chat import split_thinking
from nanoseek.infer.engine import Completion, Engine, EngineBusy, EngineError, Event, Request
from nanoseek.infer.sampling import SamplingError, SamplingParams
from nanoseek.serve.icons import png_icon
from nanoseek.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ReasoningSplitter,
    SamplingRequest,
    ToolCallSplitter,
    ToolChoice,
    check_tool_replies,
    error_body,
    split_reasoning,
    split_tool_calls,
)
from nanoseek.serve.worker import EngineWorker
from nanoseek.tools import CALCULATOR, TOOL_CALL_BEGIN, TOOL_CALLS_BEGIN, TOOL_SEP

STATIC = Path(__file__).parent / "static"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_n: int = 8
    max_tokens: int | None = None  # default: the context window


# ---------------------------------------------------------------------------------------
# the app

def create_app(engine: Engine, model_name: str = "nanoseek", api_key: str | None = None,
               limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="nanoseek", version=__version__, lifespan=_lifespan, docs_url=None, redoc_url=None)
    # the handlers are module-level, shared by every app, and find what this one serves here
    app.state.engine = engine
    app.state.worker = EngineWorker(engine)
    app.state.tokenizer = engine.tok
    app.state.model_name = model_name
    app.state.api_key = api_key
    app.state.limits = limits
    app.state.created = int(time.time())
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    for path, endpoint, options in _ROUTES:
        app.add_api_route(path, endpoint, **options)
    return app


async def check_key(request: HTTPRequest) -> None:
    """The API key, when the server has one: `Authorization: Bearer <key>`, else 401."""
    api_key = request.app.state.api_key
    if api_key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if not given:
        raise APIError(401, "missing API key: send Authorization: Bearer <key>", code="invalid_api_key")
    if not secrets.compare_digest(given.encode(), api_key.encode()):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")


# ---------------------------------------------------------------------------------------
# the routes, which create_app adds to each app with `add_api_route`. Not an APIRouter: recent
# FastAPI's `include_router` mounts the router, resolved lazily, rather than copying its routes
# into the app; this way each app holds its own routes, exactly as `@app.get` gave it.

_Endpoint = Callable[..., Any]
_ROUTES: list[tuple[str, _Endpoint, dict[str, Any]]] = []  # (path, endpoint, add_api_route's options)


def _route(path: str, method: str = "GET", **options: Any) -> Callable[[_Endpoint], _Endpoint]:
    def add(endpoint: _Endpoint) -> _Endpoint:
        _ROUTES.append((path, endpoint, {"methods": [method], **options}))
        return endpoint
    return add


# a dependency rather than a call in each handler: FastAPI runs it before it validates the
# body, so a request without the key gets a 401, not a 400 about its fields
_KEYED = [Depends(check_key)]


# ---------------------------------------------------------------------------------------
# the OpenAI API

@_route("/health")
async def health(request: HTTPRequest):
    state = request.app.state
    if state.worker.error is not None:
        return JSONResponse({"status": "error", "error": str(state.worker.error)}, status_code=500)
    return {"status": "ok", "model": state.model_name, "running": len(state.engine.running),
            "waiting": len(state.engine.waiting)}


@_route("/v1/models", dependencies=_KEYED)
async def models(request: HTTPRequest):
    return {"object": "list", "data": [_model_card(request.app.state)]}


@_route("/v1/models/{name}", dependencies=_KEYED)
async def model(name: str, request: HTTPRequest):
    _check_model(request.app.state, name)
    return _model_card(request.app.state)


@_route("/v1/chat/completions", "POST", dependencies=_KEYED)
async def chat(body: ChatRequest, request: HTTPRequest):
    state = request.app.state
    _check_model(state, body.model)
    if not body.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if len(body.messages) > state.limits.max_messages:
        raise APIError(400, f"{len(body.messages)} messages; at most {state.limits.max_messages}", param="messages")
    check_tool_replies(body.messages)
    tools, prefix = _tools(body, state.tokenizer)
    try:
        text = state.tokenizer.render_chat(_messages(body), add_generation_prompt=True, tools=tools)
    except TokenizerError as e:
        raise APIError(400, str(e), param="messages") from None
    prompt = state.tokenizer.encode(text + prefix)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _params(body, max_tokens, len(prompt), "messages", state.engine, state.limits)
    # the built-in calculator runs inside the response, unless the client brings its own
    params.builtin_tools = () if any(t["function"]["name"] == CALCULATOR for t in tools or []) else (CALCULATOR,)
    return await _respond(state.worker, body, prompt, params, request, state.model_name, chat=True, prefix=prefix)


def _messages(body: ChatRequest) -> list[dict]:
    """The request's messages as the chat template takes them."""
    msgs = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role {m.role!r} is not one of system, developer, user, "
                                "assistant, tool", param=f"messages.{i}.role")
        text = _text(m.content)
        msg: dict[str, Any] = {"role": ROLES[m.role], "content": text}
        if m.role == "assistant":
            msg["content"] = split_thinking(text)[1]  # the reasoning of earlier turns is not sent back...
            if m.tool_calls:  # ...but a turn that called the client's tools goes on after their outputs
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
                if m.reasoning_content:
                    msg["reasoning_content"] = m.reasoning_content
        msgs.append(msg)
    return msgs


def _tools(body: ChatRequest, tok) -> tuple[list[dict] | None, str]:
    """(the client's tools to list in the prompt, text that opens the call `tool_choice` demands)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    if choice not in (None, "none", "auto") and not tools:
        raise APIError(400, "tool_choice names a tool call, but the request has no tools", param="tool_choice")
    if tools and not tok.tools:
        raise APIError(400, "this model's tokenizer has no tool-call tokens: it cannot call tools", param="tools")
    names = [t["function"]["name"] for t in tools or []]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: each function needs its own name", param="tools")
    if choice == "none":
        return None, ""
    if choice == "required":
        return tools, TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN
    if isinstance(choice, ToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        return tools, TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + choice.function.name + TOOL_SEP
    return tools, ""


@_route("/v1/completions", "POST", dependencies=_KEYED)
async def completions(body: CompletionRequest, request: HTTPRequest):
    state = request.app.state
    _check_model(state, body.model)
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise APIError(400, "one prompt per request", param="prompt")
        body.prompt = body.prompt[0]
    prompt = state.tokenizer.encode(body.prompt)
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    params = _params(body, body.max_tokens if body.max_tokens is not None else 16, len(prompt), "prompt",
                     state.engine, state.limits)
    return await _respond(state.worker, body, prompt, params, request, state.model_name, chat=False)


# ---------------------------------------------------------------------------------------
# the web chat

@_route("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@_route("/sw.js", include_in_schema=False)
async def service_worker():  # served from the root so that its scope is the whole app
    return FileResponse(STATIC / "sw.js", media_type="text/javascript",
                        headers={"Service-Worker-Allowed": "/", "Cache-Control": "no-cache"})


@_route("/manifest.webmanifest", include_in_schema=False)
async def manifest():
    return FileResponse(STATIC / "manifest.webmanifest", media_type="application/manifest+json")


@_route("/static/{name}", include_in_schema=False)
async def static(name: str):
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file():
        raise APIError(404, f"no such file: {name}", code="not_found")
    return FileResponse(path)


@_route("/icons/icon-{size}.png", include_in_schema=False)
async def icon(size: int):
    if size not in (180, 192, 512):
        raise APIError(404, "icons come in 180, 192 and 512", code="not_found")
    return Response(png_icon(size), media_type="image/png", headers={"Cache-Control": "max-age=86400"})


# ---------------------------------------------------------------------------------------
# the app's lifetime, and errors as OpenAI's JSON

@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.worker.start()
    yield
    app.state.worker.stop()


async def _api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)


async def _validation_error(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return JSONResponse(error_body(f"malformed JSON body: {err.get('msg')}", code="invalid_json"), 400)
    if not loc:
        return JSONResponse(error_body("the request body must be a JSON object", code="invalid_json"), 400)
    param = ".".join(loc) or None
    msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
    return JSONResponse(error_body(msg, param=param, code="invalid_value"), status_code=400)


async def _http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code)


# ---------------------------------------------------------------------------------------
# answering a request

def _check_model(state: State, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _model_card(state: State) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nanoseek",
            "context_length": state.engine.context}


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text or "" for p in content if p.type == "text")


def _params(body: SamplingRequest, max_tokens: int | None, prompt_len: int, what: str, engine: Engine,
            limits: Limits) -> SamplingParams:
    ctx = engine.context
    if prompt_len >= ctx:
        raise APIError(400, f"this model's context window is {ctx} tokens and your {what} came to {prompt_len} "
                            f"tokens, {prompt_len - ctx + 1} more than fit with room for a reply; shorten it",
                       param=what, code="context_length_exceeded")
    cap = limits.max_tokens or ctx
    if max_tokens is not None and not 1 <= max_tokens <= cap:
        raise APIError(400, f"max_tokens must be between 1 and {cap}, not {max_tokens}", param="max_tokens")
    if body.n > min(limits.max_n, engine.max_seqs):
        raise APIError(400, f"n must be at most {min(limits.max_n, engine.max_seqs)}", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
    room = ctx - prompt_len
    try:
        return SamplingParams(
            max_tokens=min(max_tokens if max_tokens is not None else room, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
            seed=body.seed, stop=stop, n=body.n).validate()
    except SamplingError as e:
        raise APIError(400, str(e)) from None


async def _respond(worker: EngineWorker, body: SamplingRequest, prompt: list[int], params: SamplingParams,
                   request: HTTPRequest, model_name: str, chat: bool, prefix: str = ""):
    try:
        req, queue = worker.submit(prompt, params)
    except EngineBusy as e:
        raise APIError(429, str(e), code="rate_limit_exceeded", kind="rate_limit_error") from None
    except EngineError as e:
        raise APIError(400, str(e)) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _stream(worker, req, queue, request, rid, model_name, chat, include_usage, prefix)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while not req.finished:
            item = await _next(queue, request)
            if item is None:  # the client went away
                worker.abort(req)
                return Response(status_code=499)
    except asyncio.CancelledError:
        worker.abort(req)
        raise
    return _final(req, rid, model_name, chat, prefix)


async def _next(queue: asyncio.Queue, request: HTTPRequest | None) -> Event | None:
    """The next event, or None if the client disconnected while waiting. Streams pass no
    request: Starlette cancels a streaming response whose client left (CancelledError)."""
    if request is None:
        item = await queue.get()
        if isinstance(item, BaseException):
            raise APIError(500, f"the engine failed: {item}", kind="server_error")
        return item
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if isinstance(item, BaseException):
            raise APIError(500, f"the engine failed: {item}", kind="server_error")
        return item


def _usage(req: Request) -> dict:
    completion = sum(len(c.token_ids) for c in req.outputs)
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(req.prompt_ids) + completion}


def _tool_calls(c: Completion) -> list[dict]:
    """OpenAI's tool_calls for the client's calls that ended `c`."""
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}
            for call in c.calls if call["output"] is None] if c.finish_reason == "tool_calls" else []


def _final(req: Request, rid: str, model_name: str, chat: bool, prefix: str = "") -> dict:
    choices = []
    for c in req.outputs:
        if chat:
            calls = _tool_calls(c)
            reasoning, content = split_reasoning(split_tool_calls(prefix + c.text, c.finish_reason))
            message = {"role": "assistant", "content": content or (None if calls else ""),
                       "reasoning_content": reasoning}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": c.index, "message": message, "logprobs": None, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "system_fingerprint": f"nanoseek-{__version__}", "choices": choices,
            "usage": _usage(req)}


async def _stream(worker: EngineWorker, req: Request, queue: asyncio.Queue, request: HTTPRequest, rid: str,
                  model_name: str, chat: bool, include_usage: bool, prefix: str = "") -> AsyncIterator[str]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    splitters = [ReasoningSplitter() for _ in req.outputs]
    calls = [ToolCallSplitter() for _ in req.outputs]
    for c in calls:
        c.feed(prefix)  # (the opening of a call that tool_choice demanded: held back like the model's own)

    head = json.dumps({"id": rid, "object": kind, "created": created, "model": model_name,
                       "system_fingerprint": f"nanoseek-{__version__}"})[:-1]  # without its closing brace
    tail = ', "usage": null}' if include_usage else "}"

    def chunk(choices: list[dict]) -> str:
        return f'data: {head}, "choices": {json.dumps(choices)}{tail}\n\n'

    def choice(i: int, reasoning: str = "", content: str = "", finish: str | None = None,
               role: bool = False) -> dict:
        if not chat:
            return {"index": i, "text": content, "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content or role:
            delta["content"] = content
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    try:
        if chat:
            yield chunk([choice(i, role=True) for i in range(len(req.outputs))])
        while not req.finished:
            events = [await _next(queue, None)]
            while not queue.empty():  # whatever else arrived meanwhile goes out in the same write
                events.append(await _next(queue, None))
            out = []
            for e in events:
                s = splitters[e.index]
                text = calls[e.index].feed(e.text) if chat else e.text
                if e.finish_reason is not None and chat:
                    text += calls[e.index].finish(e.finish_reason)
                reasoning, content = s.feed(text) if chat else ("", text)
                if e.finish_reason is not None and chat:
                    r2, c2 = s.flush()
                    reasoning, content = reasoning + r2, content + c2
                if reasoning or content:
                    out.append(chunk([choice(e.index, reasoning, content)]))
                tool_calls = _tool_calls(req.outputs[e.index]) if chat and e.finish_reason else []
                if tool_calls:
                    deltas = [{"index": k, **call} for k, call in enumerate(tool_calls)]
                    out.append(chunk([{"index": e.index, "delta": {"tool_calls": deltas}, "logprobs": None,
                                       "finish_reason": None}]))
                if e.finish_reason is not None:
                    out.append(chunk([choice(e.index, finish=e.finish_reason)]))
            if out:
                yield "".join(out)
        end = "data: [DONE]\n\n"
        if include_usage:
            usage = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [],
                     "usage": _usage(req)}
            end = f"data: {json.dumps(usage)}\n\n" + end
        yield end
    except asyncio.CancelledError:  # the client disconnected mid-stream: free its rows now
        worker.abort(req)
        raise
    finally:
        if not req.finished:
            worker.abort(req)


class BodyLimit:
    """413 for request bodies over `limit` bytes (by Content-Length, or as they stream in)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send) -> None:
        body = json.dumps(error_body(f"request body over the {self.limit}-byte limit",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
