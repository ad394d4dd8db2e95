"""The GPU path: vLLM engines through ``ray.serve.llm``, LoRA adapters per policy version.

``ray.serve.llm`` loads LoRA adapters on demand from object storage (``vllm.lora_path``:
``s3://``/``gs://``/``abfss://``/``azure://``, one sub-folder per adapter) and routes a request for
``<base>:<adapter>`` to a replica that holds it (Serve model multiplexing). Our Gateway keeps the
front door (auth, limits, triage, guard) and forwards the client's body to the ``LLMServer``
deployment the way ray.serve.llm's own ``OpenAiIngress`` does: validated by ``ray.serve.llm``'s
own ``ChatCompletionRequest`` / ``CompletionRequest`` (vLLM's request models), so every field
vLLM's OpenAI server accepts — ``logprobs``, ``seed``, penalties, ``response_format``, ``tools``,
``guided_*``, ``top_k`` … — reaches the engine unchanged. The Gateway only removes its own
``guard`` field, names the model as ``<base>[:<adapter>]``, and sets ``max_tokens`` to
``limits.default_max_tokens`` when the client gave neither ``max_tokens`` nor
``max_completion_tokens``.

Imported only when ``backend: vllm`` is chosen; vLLM is not needed on CPU.
NOT run on a GPU so far (no GPU, no vLLM wheel where it was written): the CPU tests check the
settings and, with stand-in request models, that a body reaches the handle unchanged.
"""

from __future__ import annotations

from pydantic import ValidationError

from trace_ray.config import ConfigError

from serve import openai_format as oa
from serve.state import REMOTE
from serve.schemas import ClientError, check_generation, validation_message


def check_settings(table, opts) -> None:
    """What the vLLM path cannot serve, as ``ConfigError`` before anything starts (no vLLM needed)."""
    if table.base_spec.startswith("pypi:") or table.base_spec.endswith(".gguf"):
        raise ConfigError(f"model: {table.base_spec} is a GGUF model; the vllm backend serves HF folders or hub ids")
    if opts.lora_path and not opts.lora_path.startswith(REMOTE):
        raise ConfigError(f"vllm.lora_path: {opts.lora_path!r} must start with s3://, gs://, abfss:// or azure://")
    root = (opts.lora_path or "").rstrip("/")
    misplaced = [n for n, folder in table.adapters.items() if not root or folder.rstrip("/") != f"{root}/{n}"]
    if misplaced:
        raise ConfigError(
            "vllm.lora_path: ray.serve.llm loads LoRA adapters from object storage, one sub-folder per adapter "
            f"named as the adapter; upload {', '.join(misplaced)} to <lora_path>/<name>/, set vllm.lora_path and "
            "give adapters as {name: <lora_path>/<name>} — or use backend: hf for local adapter folders"
        )
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("backend: vllm needs the vllm package (a CUDA machine: pip install 'trace-ray[gpu]'); "
                          "use backend: hf on CPU")


def llm_config(table, opts):
    """``ModelTable`` + ``VLLMOptions`` → ``ray.serve.llm.LLMConfig``."""
    check_settings(table, opts)
    from ray.serve.llm import LLMConfig

    kwargs = dict(
        model_loading_config={"model_id": table.base_name, "model_source": table.base_spec},
        deployment_config={"autoscaling_config": {"min_replicas": opts.min_replicas,
                                                  "max_replicas": opts.max_replicas}},
        engine_kwargs=dict(opts.engine_kwargs),
    )
    if opts.accelerator_type:
        kwargs["accelerator_type"] = opts.accelerator_type
    if opts.lora_path:
        kwargs["lora_config"] = {"dynamic_lora_loading_path": opts.lora_path,
                                 "max_num_adapters_per_replica": opts.max_num_adapters_per_replica}
    return LLMConfig(**kwargs)


def vllm_deployment(table, opts):
    """A bound ``LLMServer`` deployment (``ray.serve.llm.build_llm_deployment``)."""
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(llm_config(table, opts))


def request_models():
    """``ray.serve.llm``'s request/error models (imports vLLM: GPU machines only)."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest, ErrorResponse

    return ChatCompletionRequest, CompletionRequest, ErrorResponse


def _texts(kind: str, request) -> dict[str, str]:
    """Every text of a validated request, by where it is (for ``limits.max_text_chars``)."""
    out = {}
    if kind == "chat":
        for i, m in enumerate(request.messages):
            content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            parts = [content] if isinstance(content, str) else list(content or [])
            out[f"messages[{i}].content"] = "".join(p if isinstance(p, str) else (p.get("text") or "")
                                                    for p in parts if isinstance(p, (str, dict)))
    else:
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        out.update({f"prompt[{i}]": p for i, p in enumerate(prompts) if isinstance(p, str)})
    return out


class VLLMForwarder:
    """Forwards a client's body to ``LLMServer.chat`` / ``.completions`` and relays the answer."""

    def __init__(self, handle, table, models=None):
        self.handle, self.table = handle, table
        self._models = models  # (chat, completion, error) request classes; default: request_models()

    def build(self, kind: str, data, gateway):
        """The body → (validated request, adapter, model id, guard, max_tokens); ClientError on a bad one."""
        chat_cls, completion_cls, _ = self._models or request_models()
        if not isinstance(data, dict):
            raise ClientError(422, "body: expected a JSON object")
        data = dict(data)
        guard = gateway._want_guard(data.pop("guard", None))  # trace-ray's own field: vLLM never sees it
        adapter, model_id = gateway._adapter(data.get("model"))
        data["model"] = model_id
        if data.get("max_tokens") is None and data.get("max_completion_tokens") is None:
            data["max_tokens"] = gateway.limits.default_max_tokens
        try:
            request = (chat_cls if kind == "chat" else completion_cls).model_validate(data)
        except ValidationError as e:
            raise ClientError(422, validation_message(e)) from None
        if kind == "chat":
            if len(request.messages) > gateway.limits.max_messages:
                raise ClientError(413, f"messages has {len(request.messages)} entries; the limit is "
                                       f"{gateway.limits.max_messages}")
            for m in request.messages:  # materialise iterables (pydantic's ValidatorIterator does not pickle)
                if isinstance(m, dict) and m.get("content") is not None and not isinstance(m["content"], str):
                    m["content"] = list(m["content"])
        if guard and getattr(request, "stream", False):
            raise ClientError(400, "guard: not implemented for stream: true on the vllm backend (ask without stream)",
                              param="guard")
        stop = getattr(request, "stop", None)
        max_tokens = check_generation(
            gateway.limits, max_tokens=getattr(request, "max_completion_tokens", None) or request.max_tokens,
            n=request.n or 1, stops=[stop] if isinstance(stop, str) else list(stop or []), texts=_texts(kind, request))
        return request, adapter, model_id, guard, max_tokens

    async def forward(self, kind, data, gateway):
        from fastapi.responses import JSONResponse, StreamingResponse

        error_cls = (self._models or request_models())[2]
        request, adapter, model_id, guard, _ = self.build(kind, data, gateway)
        method = "chat" if kind == "chat" else "completions"
        h = self.handle.options(stream=True) if adapter is None else self.handle.options(
            stream=True, multiplexed_model_id=model_id)
        gen = getattr(h, method).remote(request, None)
        first = await gen.__anext__()
        head = first[0] if isinstance(first, list) and first else first
        if isinstance(head, error_cls):
            code = int(head.error.code or 500)
            if 400 <= code < 500:
                raise ClientError(code, head.error.message, head.error.type or "invalid_request_error")
            return JSONResponse(oa.error_body("generation failed", "server_error", code), status_code=code)
        if not getattr(request, "stream", False):
            body = head.model_dump()
            if guard:
                prompts = ([next((m["content"] for m in reversed(request.messages) if m.get("role") == "user"), "")]
                           if kind == "chat" else [p for p in (request.prompt if isinstance(request.prompt, list)
                                                               else [request.prompt])])
                texts = [c["message"]["content"] if kind == "chat" else c["text"] for c in body["choices"]]
                per = max(1, len(texts) // max(1, len(prompts)))
                verdicts = await gateway._guard(adapter, [str(prompts[min(i // per, len(prompts) - 1)])
                                                          for i in range(len(texts))], texts)
                for c, v in zip(body["choices"], verdicts):
                    c["guard"] = v
            return body

        def fmt(item) -> str:
            items = item if isinstance(item, list) else [item]
            return "".join(x if isinstance(x, str) else oa.sse(x if isinstance(x, dict) else x.model_dump())
                           for x in items)

        async def events():
            done = False
            for item in [first]:
                s = fmt(item)
                done |= "data: [DONE]" in s
                yield s
            async for item in gen:
                s = fmt(item)
                done |= "data: [DONE]" in s
                yield s
            if not done:
                yield oa.DONE

        return StreamingResponse(events(), media_type="text/event-stream")
