"""The HTTP side: OpenAI's chat-completions API (plain and streamed), models, health, and
the viewer page, as a Starlette app (FastAPI) in front of one `Engine`.

Responses follow OpenAI's shapes, so the official client and tools built on it (lmms-eval's
OpenAI-compatible model) work unchanged; what this server adds sits in extra fields:
each choice carries `grounding` (per answer token: text, id, grounding logit, flag, whether it
is an object word), and with
`"grounding_patches": true` the per-patch evidence behind each scored token (heatmaps).
Errors are OpenAI's {"error": {...}} with a 4xx status, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from jaxground.eval.heatmap import PATCH_EVIDENCE, PATCH_EVIDENCE_DEFAULT
from jaxground.serve.engine import Engine, Failed, Finished, TokenEvent
from jaxground.serve.messages import Limits, RequestError, parse_request

DISCONNECT_POLL_S = 0.25


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               limits: Limits = Limits(), max_body_bytes: int = 32 << 20,
               image_aspect_ratio: str = "crop") -> FastAPI:
    """The app; `image_aspect_ratio` ("pad" | "crop") tells the page how the model saw the
    image, so that heatmaps land on the right pixels."""
    app = FastAPI(title="jaxground", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    evidence = PATCH_EVIDENCE.get(engine.model.config.grounding.type, PATCH_EVIDENCE_DEFAULT)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(RequestError(str(exc.detail), None, status=exc.status_code,
                                   code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(exc)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise RequestError("Incorrect or missing API key: send 'Authorization: Bearer "
                               "<key>'", None, "invalid_api_key", status=401)

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise RequestError(f"request body over the limit of {max_body_bytes} bytes", None,
                               "request_too_large", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise RequestError(f"request body over the limit of {max_body_bytes} bytes",
                                   None, "request_too_large", status=413)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}", None,
                               "invalid_json") from e

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "jaxground"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (importlib.resources.files("jaxground.serve") / "static" / "index.html"
                ).read_text(encoding="utf-8")

    @app.get("/v1/viewer_config")
    async def viewer_config():
        """What the page needs to draw: how images were fitted, what heatmaps show."""
        return {"model": model_name, "image_aspect_ratio": image_aspect_ratio,
                "evidence": evidence, "flag_threshold": engine.flag_threshold,
                "needs_key": api_key is not None, "max_tokens": engine.shapes.max_tokens}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        body = await read_body(request)
        chat_request = await run_in_threadpool(parse_request, body, limits, (model_name,))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = await run_in_threadpool(
            engine.submit, chat_request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        reply = _Reply(chat_request, model_name, engine, created=int(time.time()))
        if chat_request.stream:
            return StreamingResponse(_stream(job, events, reply),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if isinstance(event, Failed):
                    return JSONResponse({"error": {"message": event.message,
                                                   "type": "server_error", "param": None,
                                                   "code": None}}, status_code=500)
                reply.add(event)
                if isinstance(event, Finished):
                    return reply.completion()
        finally:
            if not reply.finished:
                job.cancel()

    return app


async def _stream(job, events: asyncio.Queue, reply: "_Reply"):
    """Server-sent events as OpenAI streams them: a role chunk, a chunk per token, the
    finish chunk, an optional usage chunk, then [DONE]. A client that goes away cancels
    the task at its next await: the job is stopped and its batch row freed."""
    try:
        yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Failed):
                yield _sse({"error": {"message": event.message, "type": "server_error",
                                      "param": None, "code": None}})
                break
            reply.add(event)
            if isinstance(event, TokenEvent):
                yield _sse(reply.chunk({"content": event.text}, tokens=[event]))
            else:
                if event.text:
                    yield _sse(reply.chunk({"content": event.text}))
                yield _sse(reply.chunk({}, finish_reason=reply.finish_reason,
                                       patches=reply.patches_field()))
                if reply.request.include_usage:
                    yield _sse({**reply.header("chat.completion.chunk"), "choices": [],
                                "usage": reply.usage()})
                break
        yield "data: [DONE]\n\n"
    finally:
        if not reply.finished:
            job.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Reply:
    """Accumulates a job's events into OpenAI's response and chunk shapes."""

    def __init__(self, request, model_name: str, engine: Engine, created: int):
        self.request, self.model_name, self.engine, self.created = (
            request, model_name, engine, created)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.text, self.tokens, self.end = "", [], None

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def finish_reason(self) -> str | None:
        return None if self.end is None else self.end.reason

    def add(self, event) -> None:
        self.text += event.text
        if isinstance(event, TokenEvent):
            self.tokens.append(event)
        elif isinstance(event, Finished):
            self.tokens.extend(event.tokens or [])
            self.end = event

    def header(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.model_name, "system_fingerprint": "jaxground"}

    def usage(self) -> dict:
        return {"prompt_tokens": self.end.prompt_tokens,
                "completion_tokens": self.end.completion_tokens,
                "total_tokens": self.end.prompt_tokens + self.end.completion_tokens}

    def _logprobs(self, tokens: list[TokenEvent]) -> dict | None:
        if not self.request.logprobs:
            return None
        def entry(text, logprob):
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**entry(t.token, t.logprob),
                             "top_logprobs": [entry(s, p) for s, _, p in t.top]}
                            for t in tokens], "refusal": None}

    def threshold(self) -> float:
        r = self.request
        return self.engine.flag_threshold if r.flag_threshold is None else r.flag_threshold

    @staticmethod
    def _grounding(tokens: list[TokenEvent]) -> list[dict]:
        return [{"token": t.token, "token_id": t.token_id, "logit": t.grounding,
                 "flagged": t.flagged, "object": t.object_word} for t in tokens]

    def patches_field(self) -> dict | None:
        if self.end is None or self.end.patches is None:
            return None
        return {"grid": self.end.grid, "scores": self.end.patches}

    def chunk(self, delta: dict, tokens: list[TokenEvent] = (), finish_reason=None,
              patches=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(list(tokens))
                  if tokens else None, "finish_reason": finish_reason}
        if tokens:
            choice["grounding"] = self._grounding(list(tokens))
        if finish_reason is not None:
            choice["grounding_threshold"] = self.threshold()
            if patches is not None:
                choice["grounding_patches"] = patches
        return {**self.header("chat.completion.chunk"), "choices": [choice]}

    def completion(self) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": self.text,
                                          "refusal": None},
                  "logprobs": self._logprobs(self.tokens), "finish_reason": self.finish_reason,
                  "grounding": self._grounding(self.tokens),
                  "grounding_threshold": self.threshold()}
        patches = self.patches_field()
        if patches is not None:
            choice["grounding_patches"] = patches
        return {**self.header("chat.completion"), "choices": [choice], "usage": self.usage()}
