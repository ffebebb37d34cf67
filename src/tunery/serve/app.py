"""The OpenAI-compatible HTTP API: GET /v1/models, POST /v1/chat/completions (streaming SSE and not)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..generate import Generator, SamplingParams
from ..generate.chat import chat_prompt_ids
from .batcher import Batcher, Request


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None,
                                                               "code": code}})


def _content_text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text parts are used."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, dict):
                raise ValueError(f"message content part of type {part.get('type')!r} is not supported (text only)")
        return "".join(texts)
    raise ValueError("message content must be a string or a list of text parts")


def _sampling(body: dict[str, Any], default_max_tokens: int) -> tuple[SamplingParams, list[str]]:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    temperature = body.get("temperature")
    params = SamplingParams(
        max_new_tokens=int(max_tokens),
        temperature=float(1.0 if temperature is None else temperature),
        top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
        top_k=int(body.get("top_k") or 0),
        repetition_penalty=float(body.get("repetition_penalty") or 1.0),
    )
    stop = body.get("stop") or []
    stops = [stop] if isinstance(stop, str) else [str(s) for s in stop]
    return params, stops


def create_app(model: Any, tokenizer: Any, model_name: str = "tunery", api_key: str | None = None,
               max_batch: int = 16, batch_wait_ms: float = 5.0, default_max_tokens: int = 512,
               generator: Generator | None = None):
    """The FastAPI app. One background thread generates; concurrent requests share its batches.
    With `api_key`, every request must carry `Authorization: Bearer <api_key>`."""
    engine = generator or Generator(model, tokenizer)
    batcher = Batcher(engine, tokenizer, max_batch=max_batch, wait_ms=batch_wait_ms)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="Tunery", version="1", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.model_name = model_name
    created = int(time.time())

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return _error(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                              "invalid_request_error", "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **batcher.stats}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tunery"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        try:
            body = await request.json()
        except Exception:
            return _error(400, "the request body is not valid JSON")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "`messages` must be a non-empty list")
        n = int(body.get("n") or 1)
        if not 1 <= n <= 16:
            return _error(400, "`n` must be between 1 and 16")
        try:
            msgs = [{"role": str(m["role"]), "content": _content_text(m.get("content"))} for m in messages]
            params, stops = _sampling(body, default_max_tokens)
            prompt_ids = chat_prompt_ids(tokenizer, msgs)
        except (KeyError, TypeError) as e:
            return _error(400, f"malformed message: {e}")
        except ValueError as e:
            return _error(400, str(e))
        except Exception as e:  # the chat template refused the conversation
            return _error(400, f"could not render the conversation with the chat template: {e}")
        loop = asyncio.get_running_loop()
        seed = body.get("seed")
        reqs = [Request(prompt_ids, params, loop, asyncio.Queue(), stops, None if seed is None else int(seed) + i)
                for i in range(n)]
        for r in reqs:
            batcher.submit(r)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        name = model_name
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(reqs, cid, now, name, include_usage, request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for i, r in enumerate(reqs):
            try:
                done = await _collect(r)
            except RuntimeError as e:
                return _error(500, str(e), "server_error")
            choices.append({"index": i, "message": {"role": "assistant", "content": done["text"]},
                            "finish_reason": done["finish_reason"], "logprobs": None})
            usage["prompt_tokens"] = done["prompt_tokens"]
            usage["completion_tokens"] += done["completion_tokens"]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse({"id": cid, "object": "chat.completion", "created": now, "model": name,
                             "choices": choices, "usage": usage, "system_fingerprint": None})

    return app


async def _collect(req: Request) -> dict[str, Any]:
    while True:
        kind, value = await req.out.get()
        if kind == "done":
            return value
        if kind == "error":
            raise RuntimeError(value)


async def _sse(reqs: list[Request], cid: str, created: int, model: str, include_usage: bool, http_request: Any):
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
        payload: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                   "choices": [] if index < 0 else [{"index": index, "delta": delta,
                                                                     "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    try:
        for i in range(len(reqs)):
            yield chunk(i, {"role": "assistant", "content": ""})
        # choices stream one after the other; with n > 1 the later ones are already generated meanwhile
        for i, r in enumerate(reqs):
            while True:
                kind, value = await r.out.get()
                if kind == "delta":
                    yield chunk(i, {"content": value})
                elif kind == "done":
                    usage["prompt_tokens"] = value["prompt_tokens"]
                    usage["completion_tokens"] += value["completion_tokens"]
                    yield chunk(i, {}, value["finish_reason"])
                    break
                else:
                    yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                    return
        if include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield chunk(-1, {}, usage=usage)
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop generating for it
        for r in reqs:
            r.cancelled = True
