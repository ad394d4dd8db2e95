"""The LLM judge: prompt rendering, answer parsing, and the two engines that produce answers.

- ``render_judge_prompt(rule, prompt, response)`` / ``parse_judge_answer(rule, text)``: pure
  Python, shared by the offline triage, the hf actor, the vLLM path and the HTTP server.
- ``HFJudge``: a Ray Data class UDF (one model per actor) that runs transformers ``generate``,
  greedy, on CPU or GPU — use with ``map_batches(HFJudge, compute=ActorPoolStrategy(size=k))``.
- ``vllm_judge(ds, rule)``: Ray Data's LLM batch processor (``ray.data.llm``, vLLM engines as
  actors) on GPUs; vLLM and ``ray.data.llm`` are imported only there.

Both engines add the columns ``judge_chosen`` and ``judge_rejected`` (raw answer text) that
``trace_ray.triage`` passes to ``Policy.check(..., judge_answers=...)``.
"""

from __future__ import annotations

import string

JUDGE_COLUMNS = ("judge_chosen", "judge_rejected")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2 :]


def render_judge_prompt(rule, prompt: str, response: str) -> str:
    """The user message sent to the judge: ``rule.template`` with ``{description}`` (the policy's
    description), ``{prompt}`` (the whole conversation as a transcript, ``trace_ray.chat.transcript``)
    and ``{response}`` filled in; long texts are clipped in the middle to ``rule.max_prompt_chars``
    so one huge row cannot blow the judge's context."""
    from trace_ray.chat import transcript

    half = max(1, rule.max_prompt_chars // 2)
    return rule.template.format(
        description=rule.policy_description or "(no description given)",
        prompt=_clip(transcript(prompt or ""), half),
        response=_clip(response or "", half),
    )


def parse_judge_answer(rule, text) -> str:
    """Raw judge text → ``"non_compliant"`` | ``"compliant"`` | ``"error"``.

    The first word of the answer (lower-cased, punctuation and markdown stripped) is looked up in
    ``rule.answers`` (default: yes → non_compliant, no → compliant). Anything else — empty text,
    "maybe", a sentence that does not start with yes/no — is ``error``: a judge that does not
    answer the question must not decide a pair.
    """
    if not isinstance(text, str):
        return "error"
    words = text.strip().split()
    if not words:
        return "error"
    first = words[0].strip(string.punctuation + "*_`\"'").lower()
    for verdict in ("non_compliant", "compliant"):
        if first in rule.answers[verdict]:
            return verdict
    return "error"


def judge_messages(rule, prompt: str, response: str) -> list[dict]:
    """Chat messages for one judgement (system message only when the rule has one)."""
    msgs = [{"role": "system", "content": rule.system}] if rule.system else []
    return msgs + [{"role": "user", "content": render_judge_prompt(rule, prompt, response)}]


def judge_ids(tokenizer, messages: list[dict], max_input: int) -> list[int]:
    """The judge's input tokens: the messages through ``trace_ray.chat.prompt_ids`` (the one
    renderer), cut from the left to ``max_input`` tokens (the question sits at the end). The
    offline judge and the server's judge route both call this, so their answers agree."""
    from trace_ray.chat import prompt_ids

    return prompt_ids(tokenizer, messages)[-max_input:]


class HFJudge:
    """Ray Data class UDF: transformers ``generate`` (greedy) on one model per actor.

    Input: a pyarrow batch of canonical rows (``prompt``, ``chosen``, ``rejected``, ``_error``).
    Output: the same rows plus ``judge_chosen`` / ``judge_rejected`` (raw answer text; null for
    malformed rows, which triage files as unresolved anyway). ``rule.engine_kwargs`` may set
    ``dtype`` (default float32) and ``device`` (default: cuda when visible, else cpu).
    """

    def __init__(self, rule):
        import torch

        from trace_ray.models.load import load_model, load_tokenizer

        self.rule = rule
        kw = rule.engine_kwargs or {}
        device = kw.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(rule.model, padding_side="left")
        self.model = load_model(rule.model, dtype=kw.get("dtype", "float32"), attn_implementation=None, device=device)
        self.device = device
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_input = max(8, limit - rule.max_new_tokens)

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Greedy answers to judge conversations (``judge_messages``), ``rule.batch_size`` at a time."""
        import torch

        from trace_ray.chat import left_padded

        out: list[str] = []
        for i in range(0, len(conversations), self.rule.batch_size):
            rows = [judge_ids(self.tok, m, self.max_input) for m in conversations[i : i + self.rule.batch_size]]
            ids, mask = left_padded(self.tok, rows)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=self.rule.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            out.extend(self.tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True))
        return out

    def judge(self, prompts: list[str], responses: list[str]) -> list[str]:
        """The judge's raw answer for each (prompt, response)."""
        return self.generate([judge_messages(self.rule, p, r) for p, r in zip(prompts, responses)])

    def answers(self, rows: list[dict]) -> list[tuple[str | None, str | None]]:
        """(chosen answer, rejected answer) per row; (None, None) for rows with ``_error``."""
        todo = [i for i, r in enumerate(rows) if not r.get("_error")]
        got = self.judge([rows[i]["prompt"] for _ in (0, 1) for i in todo],
                         [rows[i][side] for side in ("chosen", "rejected") for i in todo]) if todo else []
        res: list = [(None, None)] * len(rows)
        for k, i in enumerate(todo):
            res[i] = (got[k], got[k + len(todo)])
        return res

    def __call__(self, batch):
        import pyarrow as pa

        answers = self.answers(batch.to_pylist())
        batch = batch.append_column("judge_chosen", pa.array([a[0] for a in answers], pa.string()))
        return batch.append_column("judge_rejected", pa.array([a[1] for a in answers], pa.string()))


def check_judge_model(rule) -> None:
    """Fail before any work when the judge's model is a local path that is not there, or when
    the vllm backend is asked for on an install without vLLM."""
    import importlib.util
    import os

    from trace_ray.models.load import resolve_model_spec

    folder, gguf = resolve_model_spec(rule.model)  # raises for a missing pypi: wheel or .gguf
    local = rule.model.startswith((".", "/", "~")) or os.path.exists(rule.model)
    if local and not os.path.isdir(os.path.expanduser(folder)):
        raise FileNotFoundError(f"judge model {rule.model} does not exist")
    if rule.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ImportError("judge backend 'vllm' needs vLLM on a GPU machine (pip install 'trace-ray[gpu]'); "
                          "use backend: hf on CPU")


def add_judge_answers(ds, policy, num_actors: int | None = None):
    """Add ``judge_chosen`` / ``judge_rejected`` to a dataset of canonical rows with the policy's
    judge rule: ``hf`` → an ``HFJudge`` actor pool; ``vllm`` → ``vllm_judge``."""
    import ray.data

    rule = policy.judge_rule
    size = num_actors or rule.concurrency
    if rule.backend == "vllm":
        return vllm_judge(ds, rule, concurrency=size)
    num_gpus = (rule.engine_kwargs or {}).get("num_gpus", 0)
    return ds.map_batches(HFJudge, fn_constructor_args=(rule,), batch_size=rule.batch_size,
                          batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size),
                          num_gpus=num_gpus)


PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected", "meta", "_error")


def explode_for_judge(batch, rule):
    """Pair rows → two judge rows each (``_side`` = chosen / rejected) that carry the pair's columns,
    a ``_key`` (content hash), chat ``messages`` and ``sampling_params`` for ``ray.data.llm``.
    Rows with ``_error`` get a placeholder message so every pair comes back (answers ignored)."""
    import hashlib

    import pyarrow as pa

    rows = []
    for r in batch.to_pylist():
        pair = {k: r.get(k) for k in PAIR_COLUMNS}
        key = hashlib.sha256("\x1f".join(str(pair[k]) for k in PAIR_COLUMNS).encode()).hexdigest()
        for side in ("chosen", "rejected"):
            rows.append({**pair, "_key": key, "_side": side,
                         "messages": judge_messages(rule, r["prompt"] or "", r[side] or "-"),
                         "sampling_params": {"temperature": 0.0, "max_tokens": rule.max_new_tokens}})
    return pa.Table.from_pylist(rows)


def combine_judged(group):
    """The judge rows of one ``_key`` → pair rows with ``judge_chosen`` / ``judge_rejected``.
    Identical duplicate pairs share a key; they are zipped back one to one."""
    chosen = group[group["_side"] == "chosen"].reset_index(drop=True)
    rejected = group[group["_side"] == "rejected"].reset_index(drop=True)
    out = chosen[list(PAIR_COLUMNS)].copy()
    out["judge_chosen"] = chosen["judge_answer"].values
    out["judge_rejected"] = rejected["judge_answer"].values[: len(chosen)]
    return out


def vllm_judge(ds, rule, concurrency: int = 1, engine=None):
    """The judge on vLLM engines through Ray Data's LLM batch processor (GPU).

    Each pair becomes two judge rows; the processor generates one answer each (greedy,
    ``max_new_tokens``); a group-by on the pair's key puts the two answers back on one row.
    ``engine`` stands in for the vLLM processor (``Dataset -> Dataset`` adding ``judge_answer``
    and keeping the other columns); None builds the real one, so ``vllm`` and the vLLM stage of
    ``ray.data.llm`` are imported only here.
    """
    judged = ds.map_batches(explode_for_judge, fn_args=(rule,), batch_format="pyarrow")
    if engine is None:
        try:
            import vllm  # noqa: F401  (fail early with a clear message on CPU installs)
            from ray.data.llm import build_processor, vLLMEngineProcessorConfig
        except ImportError as e:
            raise ImportError(
                "judge backend 'vllm' needs vLLM on a GPU machine (pip install 'trace-ray[gpu]'); "
                f"use backend: hf on CPU ({e})"
            ) from None
        config = vLLMEngineProcessorConfig(
            model_source=rule.model,
            engine_kwargs={"max_model_len": 4096, **(rule.engine_kwargs or {})},
            batch_size=rule.batch_size,
            concurrency=concurrency,
        )
        keep = PAIR_COLUMNS + ("_key", "_side")
        processor = build_processor(
            config,
            postprocess=lambda row: {**{k: row[k] for k in keep}, "judge_answer": row["generated_text"]},
        )
        judged = processor(judged)
    else:
        judged = engine(judged)
    # few partitions: the default (200) costs seconds of scheduling on a small cluster
    parts = max(2, 2 * concurrency)
    return judged.groupby("_key", num_partitions=parts).map_groups(combine_judged, batch_format="pandas")
