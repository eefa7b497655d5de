"""OpenAI-compatible HTTP API over the scheduler: /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events or not), /health and /metrics.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with its status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from .api_types import ChatCompletionRequest, CompletionRequest, RequestError
from .api_types import parse as parse_body
from .protocol import FinishEvent, QueueFull, Request, SamplingParams, TokenEvent
from .state import ServerState
from .tokenizer import ChatTemplateError, IncrementalDecoder

log = logging.getLogger("zse")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


class StopMatcher:
    """Finds stop strings across token boundaries; holds back text that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        buffer = self.held + text
        hits = [buffer.find(s) for s in self.stops if s in buffer]
        if hits:
            self.held = ""
            return buffer[:min(hits)], True
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:size]):
                    keep = size
                    break
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass
class Choice:
    index: int
    request: Request
    decoder: IncrementalDecoder
    stops: StopMatcher
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenEvent] = field(default_factory=list)
    last_token_at: float | None = None


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def create_app(state: ServerState) -> Starlette:
    """The ASGI app. Starlette rather than FastAPI: the handlers validate their own bodies
    (api_types.py), and FastAPI's import alone took 0.89 s of zse-run's start on the H200
    host, on the path to /health 200."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        if state.scheduler is not None:  # after uvicorn has drained the connections
            state.scheduler.stop()

    async def _api_error(request: HttpRequest, exc: ApiError):
        state.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    async def _http_error(request: HttpRequest, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    async def _unexpected(request: HttpRequest, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        state.metrics.requests.labels(request.url.path, "500").inc()
        return ApiError(500, "internal server error", "server_error").response()

    def authorize(request: HttpRequest) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not (header.startswith("Bearer ") and secrets.compare_digest(header[7:], state.api_key)):
            raise ApiError(401, "Incorrect or missing API key (send Authorization: Bearer <key>)",
                           "invalid_request_error", code="invalid_api_key")

    def require_ready() -> None:
        if not state.healthy:
            raise ApiError(503, "the model is still loading" if state.status == "loading"
                           else f"the engine is unavailable: {state.error or state.scheduler.failed}",
                           "server_error", code="model_not_ready")

    async def parse(request: HttpRequest, model_type):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            parsed = parse_body(body, model_type)
        except RequestError as exc:
            raise ApiError(400, f"invalid request: {exc.param}: {exc.message}" if exc.param
                           else f"invalid request: {exc.message}", param=exc.param) from None
        if parsed.model != state.model_name:
            raise ApiError(404, f"The model `{parsed.model}` does not exist; this server serves "
                           f"`{state.model_name}`", param="model", code="model_not_found")
        return parsed

    async def health(request: HttpRequest):
        if state.healthy:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": state.status, "error": state.error or (
            state.scheduler.failed if state.scheduler else None)}, status_code=503)

    async def metrics(request: HttpRequest):
        return PlainTextResponse(generate_latest(state.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    async def models(request: HttpRequest):
        authorize(request)
        max_len = state.max_model_len
        return JSONResponse({"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "zse", "max_model_len": max_len}]})

    async def completions(request: HttpRequest):
        authorize(request)
        body: CompletionRequest = await parse(request, CompletionRequest)
        require_ready()
        prompt = body.single_prompt
        tokenizer = state.tokenizer
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= i < state.vocab_size for i in ids):
                raise ApiError(400, "prompt token ids must be within the vocabulary", param="prompt")
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo together with logprobs is not supported", param="echo")
        echo_text = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if body.echo else ""
        return await generate(request, body, ids, body.max_tokens or 16, body.logprobs,
                              chat=False, echo_text=echo_text)

    async def chat_completions(request: HttpRequest):
        authorize(request)
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        require_ready()
        messages = [{"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        try:
            ids = state.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        limit = body.token_limit or max(1, state.max_model_len - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await generate(request, body, ids, limit, logprobs, chat=True)

    async def generate(http: HttpRequest, body, ids: list[int], max_tokens: int,
                       logprobs: int | None, chat: bool, echo_text: str = ""):
        tokenizer = state.tokenizer
        endpoint = http.url.path
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) + max_tokens > state.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {state.max_model_len} "
                           f"tokens. However, you requested {len(ids) + max_tokens} tokens "
                           f"({len(ids)} in the prompt, {max_tokens} for the completion). Please "
                           "reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop_ids = frozenset() if body.ignore_eos else frozenset(tokenizer.eos_token_ids)
        choices = []
        for index in range(body.n):
            seed = (body.seed + index) if body.seed is not None else secrets.randbits(63)
            temperature = 1.0 if body.temperature is None else body.temperature
            params = SamplingParams(temperature=temperature, top_p=body.top_p or 1.0,
                                    top_k=max(0, body.top_k or 0), seed=seed)
            request = Request(ids, params, max_tokens,
                              emit=lambda e, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, e)),
                              stop_token_ids=stop_ids, logprobs=logprobs,
                              presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty)
            choices.append(Choice(index, request, IncrementalDecoder(tokenizer),
                                  StopMatcher(body.stop_strings)))
        try:
            for choice in choices:
                state.scheduler.submit(choice.request)
        except QueueFull as exc:
            for choice in choices:
                state.scheduler.cancel(choice.request)
            raise ApiError(503, f"the server is overloaded ({exc}); retry later", "server_error",
                           code="server_overloaded") from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc), "server_error") from None
        state.metrics.prompt_tokens.inc(len(ids) * body.n)
        started = time.perf_counter()
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())

        def observe(choice: Choice) -> None:
            now = time.perf_counter()
            if choice.last_token_at is None:
                state.metrics.ttft.observe(now - started)
            else:
                state.metrics.itl.observe(now - choice.last_token_at)
            choice.last_token_at = now
            state.metrics.generation_tokens.inc()

        def on_event(choice: Choice, event) -> str:
            """Apply one engine event to a choice; returns the text it releases."""
            if isinstance(event, FinishEvent):
                if event.reason == "error":
                    raise ApiError(500, f"generation failed: {event.message}", "server_error")
                if choice.finish_reason is not None:  # stopped earlier by a stop string
                    return ""
                text, stopped = choice.stops.push(choice.decoder.flush())
                if not stopped:
                    text += choice.stops.flush()
                choice.finish_reason = "length" if event.reason == "length" and not stopped else "stop"
                return text
            if choice.finish_reason is not None:  # already stopped by a stop string
                return ""
            observe(choice)
            choice.tokens += 1
            if logprobs is not None:
                choice.logprobs.append(event)
            text, stopped = choice.stops.push(choice.decoder.push(event.token))
            if stopped:
                choice.finish_reason = "stop"
                state.scheduler.cancel(choice.request)
            return text

        finished: set[int] = set()

        async def next_event():
            while True:
                try:
                    return await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None

        def usage() -> dict:
            completion = sum(c.tokens for c in choices)
            return {"prompt_tokens": len(ids), "completion_tokens": completion,
                    "total_tokens": len(ids) + completion}

        def cancel_all() -> None:
            for choice in choices:
                if choice.index not in finished:
                    state.scheduler.cancel(choice.request)

        if not body.stream:
            try:
                while len(finished) < len(choices):
                    index, event = await next_event()
                    choice = choices[index]
                    choice.text += on_event(choice, event)
                    if isinstance(event, FinishEvent):
                        finished.add(index)
            finally:
                cancel_all()
            state.metrics.requests.labels(endpoint, "200").inc()
            if chat:
                return JSONResponse({
                    "id": request_id, "object": "chat.completion", "created": created,
                    "model": state.model_name, "usage": usage(),
                    "choices": [{"index": c.index, "finish_reason": c.finish_reason,
                                 "message": {"role": "assistant", "content": c.text},
                                 "logprobs": _chat_logprobs(tokenizer, c.logprobs)
                                 if logprobs is not None else None} for c in choices]})
            return JSONResponse({
                "id": request_id, "object": "text_completion", "created": created,
                "model": state.model_name, "usage": usage(),
                "choices": [{"index": c.index, "text": echo_text + c.text,
                             "finish_reason": c.finish_reason,
                             "logprobs": _completion_logprobs(tokenizer, c.logprobs)
                             if logprobs is not None else None} for c in choices]})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice_payload: list[dict] | None = None, usage_payload=None) -> str:
            payload = {"id": request_id, "object": "chat.completion.chunk" if chat else
                       "text_completion", "created": created, "model": state.model_name,
                       "choices": choice_payload or []}
            if include_usage:
                payload["usage"] = usage_payload
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def choice_delta(choice: Choice, text: str, event=None) -> dict:
            if chat:
                entry = {"index": choice.index, "delta": {"content": text} if text else {},
                         "finish_reason": choice.finish_reason if choice.index in finished else None}
                if logprobs is not None:
                    entry["logprobs"] = _chat_logprobs(tokenizer, [event]) if event else None
            else:
                entry = {"index": choice.index, "text": text,
                         "finish_reason": choice.finish_reason if choice.index in finished else None}
                if logprobs is not None:
                    entry["logprobs"] = _completion_logprobs(tokenizer, [event]) if event else None
            return entry

        async def stream():
            status = "200"
            try:
                for choice in choices:  # the opening delta (role, or echoed prompt)
                    if chat:
                        yield chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}])
                    elif echo_text:
                        yield chunk([{"index": choice.index, "text": echo_text, "finish_reason": None}])
                while len(finished) < len(choices):
                    index, event = await next_event()
                    choice = choices[index]
                    try:
                        text = on_event(choice, event)
                    except ApiError as exc:
                        status = str(exc.status)
                        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.type}})}\n\n"
                        return
                    if isinstance(event, FinishEvent):
                        finished.add(index)
                        yield chunk([choice_delta(choice, text)])
                    elif text or logprobs is not None:
                        yield chunk([choice_delta(choice, text, event)])
                if include_usage:
                    yield chunk([], usage())
                yield "data: [DONE]\n\n"
            finally:
                cancel_all()  # a disconnect lands here: free the slots within one step
                state.metrics.requests.labels(endpoint, status).inc()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return Starlette(
        routes=[Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/chat/completions", chat_completions, methods=["POST"])],
        exception_handlers={ApiError: _api_error, StarletteHTTPException: _http_error,
                            Exception: _unexpected},
        lifespan=lifespan)


def _completion_logprobs(tokenizer, events: list[TokenEvent]) -> dict:
    tokens = [_token_text(tokenizer, e.token) for e in events]
    offsets, position = [], 0
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in (e.top_logprobs or [])}
                             for e in events],
            "text_offset": offsets}


def _chat_logprobs(tokenizer, events: list[TokenEvent]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(e.token, e.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])]}
                        for e in events]}
