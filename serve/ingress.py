"""The HTTP front door: a FastAPI app behind ``@serve.ingress``.

Every route but ``/healthz`` needs ``Authorization: Bearer <key>`` when a key is configured (the
replica holds only its SHA-256; comparison is constant time). Bodies are read with a byte limit,
parsed as JSON and validated by pydantic; client mistakes become 4xx with an OpenAI-style
``{"error": {"message", "type"}}`` body, never a 500.
"""


import asyncio
import hashlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import openai_format as oa
from serve.schemas import (
    ChatRequest,
    ClientError,
    CompletionRequest,
    TriageBatch,
    TriageItem,
    check_chat,
    check_completion,
    check_triage,
)

log = logging.getLogger("ray.serve")
ROUTES = ("/healthz", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/triage")

app = FastAPI(title="trace-ray", docs_url=None, redoc_url=None, openapi_url=None)


def key_digest(key: str | None) -> str | None:
    return hashlib.sha256(key.encode("utf-8")).hexdigest() if key else None


def _authorized(header: str | None, digest: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    presented = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
    return hmac.compare_digest(presented, digest) and scheme.lower() == "bearer"


@app.middleware("http")
async def front_door(request: Request, call_next):
    st = request.app.state
    path = request.url.path
    label = path if path in ROUTES else "other"
    t0 = time.perf_counter()
    if path != "/healthz" and getattr(st, "key_digest", None) and not _authorized(
        request.headers.get("authorization"), st.key_digest
    ):
        resp = JSONResponse(oa.error_body("missing or invalid bearer token", "authentication_error", 401),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    else:
        declared = request.headers.get("content-length")
        limit = st.limits.max_body_bytes if hasattr(st, "limits") else None
        if declared is not None and (not declared.isdigit() or (limit and int(declared) > limit)):
            msg = "bad Content-Length" if not declared.isdigit() else f"body is {declared} bytes; the limit is {limit}"
            resp = JSONResponse(oa.error_body(msg, code=413), status_code=400 if not declared.isdigit() else 413)
        else:
            resp = await call_next(request)
    metrics = getattr(st, "metrics", None)
    if metrics:
        metrics["requests"].inc(tags={"path": label, "status": str(resp.status_code)})
        metrics["latency"].observe((time.perf_counter() - t0) * 1000.0, tags={"path": label})
    return resp


@app.exception_handler(ClientError)
async def _client_error(request: Request, exc: ClientError):
    return JSONResponse(oa.error_body(exc.message, exc.kind, exc.status), status_code=exc.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return JSONResponse(oa.error_body(str(exc.detail), "invalid_request_error", exc.status_code),
                        status_code=exc.status_code)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(oa.error_body("internal server error", "server_error", 500), status_code=500)


async def read_json(request: Request, max_bytes: int):
    """The body as JSON, read with a byte limit (also for chunked bodies without Content-Length)."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise ClientError(413, f"body is over {max_bytes} bytes")
    if not body:
        raise ClientError(400, "empty body; expected a JSON object")
    try:
        return json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClientError(400, f"malformed JSON: {e}") from None


def parse(model_cls, data):
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:8]]
        raise ClientError(422, "; ".join(parts)) from None


def _error_kind(message: str) -> str:
    return "context_length_exceeded" if "context" in message else "invalid_request_error"


def _last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


@serve.deployment(name="Gateway", max_ongoing_requests=128)
@serve.ingress(app)
class Gateway:
    """Routes requests to the generator (``llm``) and the policy (``triage``) deployments."""

    def __init__(self, llm, triage, models: dict, limits: dict, key_digest: "str | None",
                 guard_default: bool = False, policy: str | None = None, backend: str = "hf"):
        from ray.serve.metrics import Counter, Histogram

        from serve.models import ModelTable
        from serve.settings import Limits
        from trace_ray.config import from_dict

        self.llm, self.triage, self.backend = llm, triage, backend
        self.table = ModelTable(**models)
        self.limits = from_dict(Limits, limits)
        self.guard_default, self.policy = guard_default, policy
        app.state.limits = self.limits
        app.state.key_digest = key_digest
        app.state.metrics = {
            "requests": Counter("trace_serve_requests", description="HTTP requests by path and status",
                                tag_keys=("path", "status")),
            "latency": Histogram("trace_serve_request_latency_ms", description="HTTP request latency (ms)",
                                 boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                                 tag_keys=("path",)),
        }
        if backend == "vllm":
            from serve.vllm_backend import VLLMForwarder

            self.vllm = VLLMForwarder(llm, self.table)

    # -- small helpers -----------------------------------------------------------------------
    def _adapter(self, requested: str | None) -> tuple[str | None, str]:
        try:
            adapter = self.table.resolve(requested)
        except KeyError:
            raise ClientError(404, f"model {requested!r} is not served; see GET /v1/models", "model_not_found") from None
        return adapter, requested or self.table.base_name

    def _want_guard(self, asked: bool | None) -> bool:
        guard = self.guard_default if asked is None else asked
        if guard and self.triage is None:
            raise ClientError(422, "guard: the server has no policy (start it with --policy)")
        return guard

    async def _guard(self, prompts: list[str], texts: list[str]) -> list[dict]:
        items = [{"prompt": p, "response": t} for p, t in zip(prompts, texts)]
        results = await self.triage.run.remote(items)
        if len(results) == 1 and "error" in results[0]:  # guard checks carry no meta: should not happen
            raise RuntimeError(results[0]["error"])
        return results

    # -- routes ------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "backend": self.backend}

    @app.get("/v1/models")
    async def models(self):
        now = int(time.time())
        data = [{"id": self.table.base_name, "object": "model", "created": now, "owned_by": "trace-ray",
                 "root": self.table.base_spec, "parent": None}]
        for name, folder in self.table.adapters.items():
            data.append({"id": f"{self.table.base_name}:{name}", "object": "model", "created": now,
                         "owned_by": "trace-ray", "root": folder, "parent": self.table.base_name})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = parse(ChatRequest, await read_json(request, self.limits.max_body_bytes))
        max_tokens = check_chat(req, self.limits)
        adapter, model_id = self._adapter(req.model)
        guard = self._want_guard(req.guard)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if self.backend == "vllm":
            return await self.vllm.forward("chat", req, adapter, model_id, max_tokens, guard, self)
        gen = {"model": adapter, "messages": messages, "max_tokens": max_tokens,
               "temperature": req.temperature, "top_p": req.top_p, "stop": req.stops()}
        return await self._complete("chat", req, [gen], [_last_user_text(messages)], model_id, guard)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = parse(CompletionRequest, await read_json(request, self.limits.max_body_bytes))
        max_tokens = check_completion(req, self.limits)
        adapter, model_id = self._adapter(req.model)
        guard = self._want_guard(req.guard)
        if self.backend == "vllm":
            return await self.vllm.forward("completion", req, adapter, model_id, max_tokens, guard, self)
        gens = [{"model": adapter, "prompt": p, "max_tokens": max_tokens, "temperature": req.temperature,
                 "top_p": req.top_p, "stop": req.stops()} for p in req.prompts()]
        return await self._complete("completion", req, gens, req.prompts(), model_id, guard)

    @app.post("/v1/triage")
    async def triage_route(self, request: Request):
        if self.triage is None:
            raise ClientError(404, "no policy is loaded; start the server with --policy")
        data = await read_json(request, self.limits.max_body_bytes)
        single = isinstance(data, dict) and "items" not in data
        if single:
            items = [parse(TriageItem, data)]
        else:
            items = parse(TriageBatch, {"items": data} if isinstance(data, list) else data).items
        check_triage(items, self.limits)
        results = await self.triage.run.remote([it.model_dump() for it in items])
        if len(results) == 1 and "error" in results[0]:
            raise ClientError(422, results[0]["error"])
        return results[0] if single else {"policy": self.policy, "results": results}

    # -- the transformers backend --------------------------------------------------------------
    async def _complete(self, kind: str, req, gens: list[dict], prompts: list[str], model_id: str, guard: bool):
        rid = oa.new_id("chatcmpl" if kind == "chat" else "cmpl")
        if req.stream:
            return await self._stream(kind, rid, gens[0], prompts[0], model_id, guard,
                                      bool(req.stream_options and req.stream_options.include_usage))
        calls = [(g, p) for g, p in zip(gens, prompts) for _ in range(req.n)]
        results = await asyncio.gather(*(self.llm.generate.remote(g) for g, _ in calls))
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise ClientError(400, errors[0], _error_kind(errors[0]))
        make = oa.chat_choice if kind == "chat" else oa.completion_choice
        choices = [make(i, r["text"], r["finish_reason"]) for i, r in enumerate(results)]
        if guard:
            verdicts = await self._guard([p for _, p in calls], [r["text"] for r in results])
            for c, v in zip(choices, verdicts):
                c["guard"] = v
        prompt_tokens = sum(r["prompt_tokens"] for r in results[:: req.n])
        use = oa.usage(prompt_tokens, sum(r["completion_tokens"] for r in results))
        return oa.response(kind, rid, model_id, choices, use)

    async def _stream(self, kind, rid, gen, prompt, model_id, guard, include_usage):
        stream = self.llm.options(stream=True).stream.remote(gen)
        first = await stream.__anext__()
        if "error" in first:
            raise ClientError(400, first["error"], _error_kind(first["error"]))

        async def events():
            text = ""
            if kind == "chat":
                yield oa.chunk(kind, rid, model_id, role=True, text="")
            try:
                item = first
                while True:
                    if "delta" in item:
                        text += item["delta"]
                        yield oa.chunk(kind, rid, model_id, text=item["delta"])
                    else:
                        extra = {"guard": (await self._guard([prompt], [text]))[0]} if guard else None
                        yield oa.chunk(kind, rid, model_id, finish_reason=item["finish_reason"],
                                       text="" if kind == "completion" else None, extra=extra)
                        if include_usage:
                            yield oa.chunk(kind, rid, model_id,
                                           use=oa.usage(item["prompt_tokens"], item["completion_tokens"]))
                        break
                    item = await stream.__anext__()
            except Exception:  # the status line is sent already: report in-band, then end
                log.exception("stream failed")
                yield oa.sse(oa.error_body("generation failed", "server_error", 500))
            yield oa.DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
