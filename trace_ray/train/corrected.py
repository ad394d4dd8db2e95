"""The corrected-response pass (DESIGN §1, optional extension for D_II).

For every ``punish`` row a generator model writes y_c, told the new policy's description in a
system message; the policy oracle then checks y_c, and only a *compliant* y_c is kept (column
``corrected``; ``None`` otherwise, and the pair keeps dual NPO). Other rows pass through with
``corrected = None``. A ``map_batches`` class UDF (transformers ``generate``, an actor pool holds
the model once); ``train_local`` calls it on pandas batches in-process. Judge rules of the policy
get no answers here (they come back as ``error``), so a y_c is only accepted when the in-process
rules find it compliant.
"""

from __future__ import annotations

import json

import torch


class CorrectedResponses:
    def __init__(self, model_spec: str, policy_path: str, system_prompt: str, max_new_tokens: int,
                 temperature: float, seed: int = 0):
        from trace_ray.models.load import load_model, load_tokenizer
        from trace_ray.policy import load_policy

        self.tok = load_tokenizer(model_spec, padding_side="left")
        self.model = load_model(model_spec, attn_implementation=None)
        self.policy = load_policy(policy_path)
        self.system = system_prompt.replace("{policy}", self.policy.description or self.policy.name)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> list[str]:
        """y_c for each prompt: the conversation (or plain prompt) after the policy's system message,
        rendered by ``trace_ray.chat.prompt_ids`` like every other prompt."""
        from trace_ray.chat import left_padded, prompt_ids

        if not prompts:
            return []
        torch.manual_seed(self.seed)
        ids, mask = left_padded(self.tok, [prompt_ids(self.tok, p, system=self.system) for p in prompts])
        kw = {"do_sample": self.temperature > 0, "max_new_tokens": self.max_new_tokens,
              "pad_token_id": self.tok.pad_token_id}
        if self.temperature > 0:
            kw["temperature"] = self.temperature
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
        return [self.tok.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]

    def __call__(self, df):
        df = df.copy()
        idx = [i for i, c in enumerate(df["category"]) if c == "punish"]
        prompts = [str(df["prompt"].iloc[i]) for i in idx]
        texts = self.generate(prompts)
        metas = []
        for i in idx:
            try:
                metas.append(json.loads(df["meta"].iloc[i] or "{}").get("chosen", {}) if "meta" in df.columns else {})
            except (ValueError, AttributeError):
                metas.append({})
        verdicts = self.policy.check(prompts, texts, [{} for _ in metas]) if texts else []
        col = [None] * len(df)
        for i, t, v in zip(idx, texts, verdicts):
            if t and v.verdict == "compliant":
                col[i] = t
        df["corrected"] = col
        return df
