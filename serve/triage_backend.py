"""The online triage deployment: the served policies' rules run here, on the same code as offline triage.

Pairs go through ``trace_ray.triage.triage_records`` and single responses through
``Policy.check``, so an answer over HTTP equals the offline ``trace-ray triage`` answer for the
same row. A ``judge`` rule's answers come from an LLM deployment (``judge``: a handle to an
``HFGenerator``), asked once per response for the whole request batch. ``callable`` rules are
refused: a policy served over HTTP runs no user-supplied Python.
"""

from __future__ import annotations

import asyncio
import json

from ray import serve


class PolicyRefused(ValueError):
    pass


def refuse_callables(policy) -> None:
    if policy.has_callable:
        names = [r.name for r in policy.rules if r.kind == "callable"]
        raise PolicyRefused(
            f"policy {policy.fingerprint}: callable rules ({', '.join(names)}) are not allowed in the "
            "server; use them in `trace-ray triage` jobs, or replace them with regex/keywords/meta/judge rules"
        )


class TriageServer:
    """The served policies (``user_config``: ``{"policies": {name: spec}}``, first = default). A
    reload swaps the whole table at once: a request in flight keeps the policy it started with."""

    def __init__(self, judge=None, policies: dict | None = None):
        from ray.serve.metrics import Counter

        self.judge = judge
        self.policies: dict = {}
        self.verdicts = Counter("trace_serve_verdicts", description="triage verdicts by kind",
                                tag_keys=("kind", "verdict"))
        if policies is not None:  # built without Serve: no user_config
            self.reconfigure({"policies": policies})

    def reconfigure(self, config: dict) -> None:
        from trace_ray.policy import load_policy

        table = {}
        for name, spec in (config or {}).get("policies", {}).items():
            policy = load_policy(spec)
            refuse_callables(policy)
            if policy.judge_rule is not None and self.judge is None:
                raise PolicyRefused(f"policy {policy.fingerprint} has a judge rule but no judge deployment")
            table[name] = policy
        self.policies = table

    async def _judge(self, rule, prompts: list[str], responses: list[str]) -> list[str | None]:
        """Raw judge answers, one per (prompt, response); None where the judge failed."""
        from trace_ray.policy.judge import judge_messages

        reqs = [{"messages": judge_messages(rule, p, r), "max_tokens": rule.max_new_tokens,
                 "temperature": 0.0, "top_p": 1.0, "stop": [], "model": None, "judge": True}
                for p, r in zip(prompts, responses)]
        outs = await asyncio.gather(*(self.judge.generate.remote(q) for q in reqs), return_exceptions=True)
        return [o["choices"][0]["text"] if isinstance(o, dict) and o.get("choices") else None for o in outs]

    async def run(self, items: list[dict], policy: str | None = None) -> list[dict]:
        """Items as validated by ``serve.schemas.TriageItem`` (dicts), judged by the served policy
        ``policy`` (None: the default) → one result per item.

        A rule that cannot decide on an item's values (e.g. ``meta.severity`` given as text) gives
        that item an ``error`` verdict with the reason, exactly as offline triage does. Any other
        failure on a client's values answers ``[{"error": msg}]``, which the Gateway turns into a
        422 — a client's data, not a crash.
        """
        table = self.policies
        if policy is not None and policy not in table:
            return [{"error": f"policy {policy!r} is not served; served: {', '.join(table)} (GET /v1/policies)",
                     "status": 404}]
        try:
            return await self._run(table[policy] if policy is not None else next(iter(table.values())), items)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            return [{"error": f"the policy could not judge these items ({type(e).__name__}: {str(e)[:200]}); "
                              "check the types in 'meta'"}]

    async def _run(self, pol, items: list[dict]) -> list[dict]:
        from trace_ray.data.schema import row_id
        from trace_ray.triage import triage_records

        pairs = [i for i, it in enumerate(items) if it.get("response") is None]
        singles = [i for i, it in enumerate(items) if it.get("response") is not None]
        out: list[dict | None] = [None] * len(items)
        if pairs:
            records = []
            for i in pairs:
                it = items[i]
                records.append({"id": it.get("id") or row_id(it["prompt"], it["chosen"], it["rejected"]),
                                "prompt": it["prompt"], "chosen": it["chosen"], "rejected": it["rejected"],
                                "meta": json.dumps(it.get("meta") or {})})
            answers = None
            if pol.judge_rule is not None:
                flat = await self._judge(pol.judge_rule, [r["prompt"] for r in records for _ in (0, 1)],
                                         [r[k] for r in records for k in ("chosen", "rejected")])
                answers = list(zip(flat[0::2], flat[1::2]))
            for i, row in zip(pairs, triage_records(pol, records, judge_answers=answers)):
                res = {k: row[k] for k in ("id", "chosen_verdict", "rejected_verdict", "category", "policy")}
                res["reasons"] = json.loads(row["reasons"]) if isinstance(row["reasons"], str) else row["reasons"]
                out[i] = res
                self.verdicts.inc(tags={"kind": "pair", "verdict": row["category"]})
        if singles:
            prompts = [items[i]["prompt"] for i in singles]
            responses = [items[i]["response"] for i in singles]
            answers = await self._judge(pol.judge_rule, prompts, responses) if pol.judge_rule is not None else None
            verdicts = pol.check(prompts, responses, [items[i].get("meta") or {} for i in singles], answers)
            for i, v in zip(singles, verdicts):
                out[i] = {**v.to_dict(), "policy": pol.fingerprint}
                self.verdicts.inc(tags={"kind": "response", "verdict": v.verdict})
        return out  # type: ignore[return-value]


def triage_deployment(num_cpus: float = 0.1):
    return serve.deployment(TriageServer, name="Triage", ray_actor_options={"num_cpus": num_cpus},
                            max_ongoing_requests=64)
