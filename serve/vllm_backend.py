"""The GPU path: vLLM engines through ``ray.serve.llm``, LoRA adapters per policy version.

``ray.serve.llm`` loads LoRA adapters on demand from object storage (``vllm.lora_path``:
``s3://``/``gs://``/``abfss://``/``azure://``, one sub-folder per adapter) and routes a request for
``<base>:<adapter>`` to a replica that holds it (Serve model multiplexing). Our Gateway keeps the
front door (auth, limits, triage, guard) and forwards validated OpenAI bodies to the
``LLMServer`` deployment, the way ray.serve.llm's own ``OpenAiIngress`` does.

Imported only when ``backend: vllm`` is chosen; vLLM is not needed on CPU.
NOT exercised by the CPU test suite (no GPU, no vLLM wheel here): see docs/serving.md.
"""

from __future__ import annotations

from trace_ray.config import ConfigError

from serve import openai_format as oa
from serve.models import REMOTE
from serve.schemas import ClientError


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


class VLLMForwarder:
    """Forwards a validated request to ``LLMServer.chat`` / ``.completions`` and relays the answer."""

    def __init__(self, handle, table):
        self.handle, self.table = handle, table

    async def forward(self, kind, req, adapter, model_id, max_tokens, guard, gateway):
        from fastapi.responses import JSONResponse, StreamingResponse
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest, ErrorResponse

        body = req.model_dump(exclude_none=True, exclude={"guard", "max_completion_tokens"})
        full_id = self.table.base_name if adapter is None else f"{self.table.base_name}:{adapter}"
        body.update(model=full_id, max_tokens=max_tokens)
        if kind == "chat":
            body["messages"] = [{"role": m.role, "content": m.text()} for m in req.messages]
            request, method = ChatCompletionRequest(**body), "chat"
        else:
            request, method = CompletionRequest(**body), "completions"
        h = self.handle.options(stream=True) if adapter is None else self.handle.options(
            stream=True, multiplexed_model_id=full_id)
        gen = getattr(h, method).remote(request, None)
        first = await gen.__anext__()
        head = first[0] if isinstance(first, list) and first else first
        if isinstance(head, ErrorResponse):
            code = int(head.error.code or 500)
            if 400 <= code < 500:
                raise ClientError(code, head.error.message, head.error.type or "invalid_request_error")
            return JSONResponse(oa.error_body("generation failed", "server_error", code), status_code=code)
        if not req.stream:
            data = head.model_dump()
            if guard:
                prompts = ([next((m.text() for m in reversed(req.messages) if m.role == "user"), "")]
                           if kind == "chat" else req.prompts())
                texts = [c["message"]["content"] if kind == "chat" else c["text"] for c in data["choices"]]
                per = max(1, len(texts) // len(prompts))
                verdicts = await gateway._guard([prompts[i // per] for i in range(len(texts))], texts)
                for c, v in zip(data["choices"], verdicts):
                    c["guard"] = v
            return data

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
