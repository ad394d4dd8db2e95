"""The HTTP front door: a FastAPI app behind ``@serve.ingress``.

Every route but ``/healthz`` needs ``Authorization: Bearer <key>`` when a key is configured (the
replica holds only its SHA-256; comparison is constant time). Bodies are read with a byte limit
and a time limit, parsed as JSON (depth-limited, valid UTF-8 only) and validated by pydantic;
client mistakes become 4xx with an OpenAI-style ``{"error": {"message", "type", "param", "code"}}``
body, never a 500. Models, adapters, policies and which policy guards which model come from the
deployment's ``user_config`` (``reconfigure``; ``serve/state.py``), so they change without a restart.
"""

import hashlib
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import openai_format as oa
from serve.body import parse, read_json
from serve.drain import Drain
from serve.schemas import (
    ChatRequest,
    ClientError,
    CompletionRequest,
    TriageBatch,
    TriageItem,
    check_chat,
    check_completion,
    check_triage,
    unsupported_fields,
)

log = logging.getLogger("ray.serve")
ROUTES = ("/healthz", "/v1/models", "/v1/policies", "/v1/chat/completions", "/v1/completions", "/v1/triage")

app = FastAPI(title="trace-ray", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(Drain)


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
            resp = JSONResponse(oa.error_body(msg, code=413), status_code=400 if not declared.isdigit() else 413,
                                headers={"Connection": "close"})
        else:
            resp = await call_next(request)
    metrics = getattr(st, "metrics", None)
    if metrics:
        metrics["requests"].inc(tags={"path": label, "status": str(resp.status_code)})
        metrics["latency"].observe((time.perf_counter() - t0) * 1000.0, tags={"path": label})
    return resp


@app.exception_handler(ClientError)
async def _client_error(request: Request, exc: ClientError):
    headers = {"Connection": "close"} if exc.status in (408, 413) else None  # the rest of the body is not read
    return JSONResponse(oa.error_body(exc.message, exc.kind, exc.status, exc.param), status_code=exc.status,
                        headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return JSONResponse(oa.error_body(str(exc.detail), "invalid_request_error", exc.status_code),
                        status_code=exc.status_code)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(oa.error_body("internal server error", "server_error", 500), status_code=500)


def _error_kind(message: str) -> str:
    return "context_length_exceeded" if "context" in message else "invalid_request_error"


def _last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


@serve.deployment(name="Gateway", max_ongoing_requests=128)
@serve.ingress(app)
class Gateway:
    """Routes requests to the generator (``llm``) and the policy (``triage``) deployments."""

    def __init__(self, llm, triage, base: dict, limits: dict, key_digest: "str | None",
                 guard_default: bool = False, backend: str = "hf"):
        from ray.serve.metrics import Counter, Histogram

        from serve.settings import Limits
        from trace_ray.config import from_dict

        self.llm, self.triage, self.backend = llm, triage, backend
        self.base = base  # {"base_spec", "base_name"}
        self.limits = from_dict(Limits, limits)
        self.guard_default = guard_default
        self.reconfigure({})
        app.state.limits = self.limits
        app.state.key_digest = key_digest
        app.state.metrics = {
            "requests": Counter("trace_serve_requests", description="HTTP requests by path and status",
                                tag_keys=("path", "status")),
            "latency": Histogram("trace_serve_request_latency_ms", description="HTTP request latency (ms)",
                                 boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                                 tag_keys=("path",)),
        }

    def reconfigure(self, config: dict) -> None:
        """``State.user_configs()["gateway"]``: adapters, policies, the guard map (serve/state.py)."""
        from serve.models import ModelTable

        config = config or {}
        self.table = ModelTable(**self.base, adapters=dict(config.get("adapters", {})))
        self.policies = {p["name"]: p for p in config.get("policies", [])}
        self.guard_map = dict(config.get("guard", {}))
        self.realigned_for = dict(config.get("realigned_for", {}))
        if self.backend == "vllm":
            from serve.vllm_backend import VLLMForwarder

            self.vllm = VLLMForwarder(self.llm, self.table)

    # -- shutdown (serve/runner.py) ------------------------------------------------------------
    def drain(self) -> int:
        """Refuse new requests from now on; returns how many are in flight."""
        app.state.draining = True
        return self.inflight()

    def inflight(self) -> int:
        return getattr(app.state, "inflight", 0)

    # -- small helpers -----------------------------------------------------------------------
    def _adapter(self, requested: str | None) -> tuple[str | None, str]:
        try:
            adapter = self.table.resolve(requested)
        except KeyError:
            raise ClientError(404, f"model {requested!r} is not served; see GET /v1/models", "model_not_found",
                              "model") from None
        return adapter, self.table.base_name if adapter is None else f"{self.table.base_name}:{adapter}"

    def _want_guard(self, asked: bool | None) -> bool:
        guard = self.guard_default if asked is None else asked
        if guard and not self.policies:
            raise ClientError(422, "guard: the server has no policy (start it with --policy)")
        return guard

    def _policy_name(self, name: str | None) -> str:
        if not self.policies:
            raise ClientError(404, "no policy is loaded; start the server with --policy")
        if name is None:
            return next(iter(self.policies))
        if name not in self.policies:
            raise ClientError(404, f"policy {name!r} is not served; served: {', '.join(self.policies)} "
                                   "(GET /v1/policies)", param="policy")
        return name

    async def _guard(self, adapter: str | None, prompts: list[str], texts: list[str]) -> list[dict]:
        """Verdicts of the policy that ``adapter`` (None: the base) was re-aligned for."""
        items = [{"prompt": p, "response": t} for p, t in zip(prompts, texts)]
        results = await self.triage.run.remote(items, self.guard_map.get(adapter or ""))
        if len(results) == 1 and "error" in results[0]:  # guard checks carry no meta: should not happen
            raise RuntimeError(results[0]["error"])
        return results

    # -- routes ------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "backend": self.backend}

    @app.get("/v1/models")
    async def list_models(self):
        now = int(time.time())

        def card(model_id, root, parent, adapter):
            return {"id": model_id, "object": "model", "created": now, "owned_by": "trace-ray", "root": root,
                    "parent": parent, "policy": self.guard_map.get(adapter), "realigned_for": self.realigned_for.get(adapter)}

        data = [card(self.table.base_name, self.table.base_spec, None, "")]
        for name, folder in self.table.adapters.items():
            data.append(card(f"{self.table.base_name}:{name}", folder, self.table.base_name, name))
        return {"object": "list", "data": data}

    @app.get("/v1/policies")
    async def list_policies(self):
        guarded: dict[str, list[str]] = {}
        for adapter, pol in self.guard_map.items():
            guarded.setdefault(pol, []).append(self.table.base_name if not adapter else f"{self.table.base_name}:{adapter}")
        return {"object": "list", "data": [{**p, "guards": guarded.get(n, [])} for n, p in self.policies.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        data = await read_json(request, self.limits)
        if self.backend == "vllm":
            return await self.vllm.forward("chat", data, self)
        req = parse(ChatRequest, data, openai=True)
        unsupported_fields(req)
        max_tokens = check_chat(req, self.limits)
        adapter, model_id = self._adapter(req.model)
        guard = self._want_guard(req.guard)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        gen = {"model": adapter, "messages": messages, **self._sampling(req, max_tokens)}
        return await self._complete("chat", req, gen, [_last_user_text(messages)], model_id, adapter, guard)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        data = await read_json(request, self.limits)
        if self.backend == "vllm":
            return await self.vllm.forward("completion", data, self)
        req = parse(CompletionRequest, data, openai=True)
        unsupported_fields(req)
        max_tokens = check_completion(req, self.limits)
        adapter, model_id = self._adapter(req.model)
        guard = self._want_guard(req.guard)
        gen = {"model": adapter, "prompts": req.prompts(), **self._sampling(req, max_tokens)}
        return await self._complete("completion", req, gen, req.prompts(), model_id, adapter, guard)

    @app.post("/v1/triage")
    async def triage_route(self, request: Request):
        if not self.policies:
            raise ClientError(404, "no policy is loaded; start the server with --policy")
        data = await read_json(request, self.limits)
        single = isinstance(data, dict) and "items" not in data
        if single:
            policy = data.pop("policy", None)
            if policy is not None and not isinstance(policy, str):
                raise ClientError(422, "policy: expected the name of a served policy (a string)", param="policy")
            items = [parse(TriageItem, data)]
        else:
            batch = parse(TriageBatch, {"items": data} if isinstance(data, list) else data)
            items, policy = batch.items, batch.policy
        name = self._policy_name(policy)
        check_triage(items, self.limits)
        results = await self.triage.run.remote([it.model_dump() for it in items], name)
        if len(results) == 1 and "error" in results[0]:
            raise ClientError(results[0].get("status", 422), results[0]["error"])
        return results[0] if single else {"policy": self.policies[name]["fingerprint"], "results": results}

    # -- the transformers backend --------------------------------------------------------------
    @staticmethod
    def _sampling(req, max_tokens: int) -> dict:
        return {"n": req.n, "max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "stop": req.stops(), "seed": req.seed, "logprobs": req.logprob_count()}

    async def _complete(self, kind: str, req, gen: dict, prompts: list[str], model_id: str, adapter, guard: bool):
        rid = oa.new_id("chatcmpl" if kind == "chat" else "cmpl")
        if req.stream:
            return await self._stream(kind, rid, gen, prompts, model_id, adapter, guard, req.include_usage())
        result = await self.llm.generate.remote(gen)
        if "error" in result:
            raise ClientError(400, result["error"], _error_kind(result["error"]))
        choices = [oa.choice(kind, i, c) for i, c in enumerate(result["choices"])]
        if guard:
            texts = [c["text"] for c in result["choices"]]
            verdicts = await self._guard(adapter, [prompts[i // req.n] for i in range(len(texts))], texts)
            for c, v in zip(choices, verdicts):
                c["guard"] = v
        use = oa.usage(result["prompt_tokens"], sum(c["completion_tokens"] for c in result["choices"]))
        return oa.response(kind, rid, model_id, choices, use)

    async def _stream(self, kind, rid, gen, prompts, model_id, adapter, guard, include_usage):
        stream = self.llm.options(stream=True).stream.remote(gen)
        first = await stream.__anext__()
        if "error" in first:
            raise ClientError(400, first["error"], _error_kind(first["error"]))
        n = gen["n"]

        async def events():
            texts: dict[int, str] = {}
            try:
                item = first
                while "prompt_tokens" not in item:
                    i = item["index"]
                    if i not in texts:
                        texts[i] = ""
                        if kind == "chat":
                            yield oa.chunk(kind, rid, model_id, index=i, role=True, text="")
                    if item["delta"] or item.get("logprobs"):
                        texts[i] += item["delta"]
                        yield oa.chunk(kind, rid, model_id, index=i, text=item["delta"], entries=item.get("logprobs"))
                    if "finish_reason" in item:
                        extra = None
                        if guard:
                            extra = {"guard": (await self._guard(adapter, [prompts[i // n]], [texts[i]]))[0]}
                        yield oa.chunk(kind, rid, model_id, index=i, finish_reason=item["finish_reason"],
                                       text="" if kind == "completion" else None, extra=extra)
                    item = await stream.__anext__()
                if include_usage:
                    yield oa.chunk(kind, rid, model_id, use=oa.usage(item["prompt_tokens"], item["completion_tokens"]))
            except Exception:  # the status line is sent already: report in-band, then end
                log.exception("stream failed")
                yield oa.sse(oa.error_body("generation failed", "server_error", 500))
            yield oa.DONE

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
