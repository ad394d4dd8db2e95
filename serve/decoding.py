"""What a ``generate`` call produced, step by step: per row the token, its log-probability and the
top alternatives (``_Recorder``), where a stop string ended it, and whether its client left.

Used by ``serve/hf_backend.py``; log-probabilities are read from the model's raw next-token
logits (a forward hook on the LM), before temperature / top-p or any logits processor, as vLLM
reports them.
"""

from __future__ import annotations


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Recorder:
    """Per decoding step, per row: the token id, and (``top`` is not None) its log-probability and
    the ``top`` most likely alternatives. A ``generate`` streamer (``put``) plus a forward hook on
    the LM (``hook``: the raw next-token logits of the step, read before sampling)."""

    def __init__(self, rows: int, top: int | None, on_step=None):
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.lps: list[list[tuple]] = [[] for _ in range(rows)]
        self.stop_at: list[int | None] = [None] * rows  # tokens up to the one that completed a stop string
        self.top, self.on_step = top, on_step
        self.cancelled = False  # the client went away: generate() stops at the next step
        self._logp = None
        self._prompt = True

    def hook(self, module, args, output):
        import torch

        self._logp = torch.log_softmax(output.logits[:, -1].float(), dim=-1)

    def put(self, value):
        if self._prompt:  # generate() first hands over the prompt ids
            self._prompt = False
            return
        toks = value.view(-1)
        if self.top is not None:
            chosen = self._logp.gather(1, toks.view(-1, 1)).squeeze(1).tolist()
            vals, idx = self._logp.topk(self.top, dim=-1) if self.top else (None, None)
            for r in range(len(self.ids)):
                alts = list(zip(idx[r].tolist(), vals[r].tolist())) if self.top else []
                self.lps[r].append((chosen[r], alts))
        for r, t in enumerate(toks.tolist()):
            self.ids[r].append(t)
        if self.on_step:
            self.on_step()

    def end(self):
        if self.on_step:
            self.on_step()

    def criterion(self, inner=None):
        """A stopping criterion: ``cancelled`` stops every row; ``inner`` (generate's own
        ``StopStringCriteria``) stops rows, the step each stopped at recorded."""
        import torch
        from transformers import StoppingCriteria

        rec = self

        class _Watched(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if inner is None:
                    hit = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                else:
                    hit = inner(input_ids, scores, **kwargs)
                    for r in hit.nonzero().view(-1).tolist():
                        if rec.stop_at[r] is None:  # runs before put() of this step: keep that token too
                            rec.stop_at[r] = len(rec.ids[r]) + 1
                return hit | rec.cancelled

        return _Watched()
