"""The vectorised execution of a policy: a whole Arrow column of responses per call.

There is one way to decide a rule (``rules.decide``: the ``regex`` module, the metadata
predicates, the callable, the judge answer) and two ways to execute it:

- **row-wise** — ``Policy.check`` / ``trace_ray.triage.triage_records``: ``decide`` per response.
  The reference; the HTTP server's ``/v1/triage`` uses it.
- **vectorised** — :func:`check_columns` (what ``run_triage`` runs on Ray Data): each rule over
  the whole batch on the engine chosen when the policy loads (:func:`plan_rules`, reported in
  ``summary.json["engines"]``), falling back to ``decide`` for exactly the rows the engine cannot
  settle:

  ========  =======================================================================================
  ``re2``   regex / keywords rules whose patterns translate (``trace_ray.policy.re2``): ONE pass
            of an RE2 set (google-re2's ``re2.Set``: one DFA, every pattern's verdict) over each
            text, with the exact Unicode translations of all such rules' patterns, the non-ASCII
            word characters and a sentinel; then each pattern's match text on the rows it hit
            only (the same translation as one RE2, compiled once per process, so its DFA
            stays warm from batch to batch). Decided row-wise: a text with non-ASCII word
            characters where a ``\\b`` rule may match (RE2's ``\\b`` is ASCII), an RE2 hit of a
            relaxed (``superset``) pattern, a text the set gave up on (no sentinel).
  ``regex`` regex / keywords rules RE2 cannot take (back-references, ``(a|aa)+``-style shapes ...):
            ``decide`` per row, with the ``regex`` module's time bound.
  ``arrow`` meta rules: the batch's ``meta`` JSON is parsed by Arrow into typed columns and the
            conditions run as Arrow kernels; rows where a field the rule reaches is missing,
            null or NaN, ``equals`` conditions, and whole batches with a mistyped field (Arrow's
            parser refuses them) are decided row-wise, which gives those their ``error`` reason.
  ``python`` callable and judge rules: ``decide`` per row.
  ========  =======================================================================================

Verdicts and reasons equal the row-wise path's on every row (``tests/test_vector.py`` checks it
on the real HH-RLHF and PKU-SafeRLHF files and on generated edge cases). One deliberate exception:
on a response where the ``regex`` module would have hit its time bound WITHOUT a match (an
``error`` row-wise), an ``re2`` rule decides "no match" — RE2 cannot run away. Patterns of the
shapes that make a backtracking engine explode stay on ``regex``, so the two paths agree there too.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from trace_ray.policy.rules import CallableRule, JudgeRule, KeywordsRule, MetaRule, RegexRule, Rule, decide

HIT, MISS, UNDECIDED = 1, 0, 2
SENTINEL = r"\z"  # first pattern of every RE2 set: it matches every text, so an empty answer is a failure
SET_MAX_MEM = 64 << 20  # RE2 memory budget of one set (compiled program + DFA cache), per process


# ---------------------------------------------------------------------------------------------
# planning (at policy load)


@dataclass
class Plan:
    """How a rule runs vectorised. ``engine``: re2 | regex | arrow | python; ``note``: why."""

    engine: str
    note: str = ""
    translations: list = field(default_factory=list)  # re2.Translation per pattern (engine re2)

    @property
    def boundary(self) -> bool:
        return any(t.boundary for t in self.translations)

    @property
    def superset(self) -> bool:
        return any(t.superset for t in self.translations)

    def to_dict(self) -> dict:
        d = {"engine": self.engine}
        if self.engine == "re2":
            d["exactness"] = "superset" if self.superset else "ascii_words" if self.boundary else "exact"
        if self.note:
            d["note"] = self.note
        return d


def plan_rules(rules: list[Rule]) -> None:
    """Choose the engine of every rule (``rule.plan``; called once, when the policy loads). The
    RE2 rules of one target run as one RE2 set; if that set does not compile within
    ``SET_MAX_MEM``, those rules fall back to the ``regex`` engine (exact, slower)."""
    for rule in rules:
        rule.plan = plan_rule(rule)
    for target in {r.target for r in rules if r.plan.engine == "re2"}:
        err = set_error(set_patterns(rules, target))
        if err:
            for r in rules:
                if r.plan.engine == "re2" and r.target == target:
                    r.plan = Plan("regex", f"the RE2 rules on the {target} do not fit one RE2 set ({err})")


def plan_rule(rule: Rule) -> Plan:
    """Choose the engine of one rule on its own."""
    if isinstance(rule, RegexRule):  # KeywordsRule too: its compiled pattern is translated alike
        from trace_ray.policy.re2 import Untranslatable, translate

        out = []
        for compiled in rule._compiled:
            try:
                tr = translate(compiled.pattern, compiled.flags)
            except Untranslatable as e:
                return Plan("regex", f"pattern {compiled.pattern[:60]!r}: {e}")
            err = set_error((SENTINEL, tr.unicode, tr.loose_unicode))
            if err:
                return Plan("regex", f"pattern {compiled.pattern[:60]!r}: RE2 cannot compile its translation ({err})")
            out.append(tr)
        return Plan("re2", "", out)
    if isinstance(rule, MetaRule):
        return Plan("arrow", "equals conditions row-wise" if rule.equals else "")
    if isinstance(rule, JudgeRule):
        return Plan("python", "judge answers parsed per row")
    return Plan("python")


def set_patterns(rules: list[Rule], target: str) -> tuple[str, ...]:
    """The RE2 set of the ``re2`` rules reading ``target``: the sentinel, the non-ASCII word
    characters, then each pattern's exact Unicode translation (and, where it uses ``\\b``, its
    loose form), in rule order, without repeats."""
    from trace_ray.policy.re2 import non_ascii_word_class

    pats = [SENTINEL, non_ascii_word_class()]
    for r in rules:
        if r.plan.engine == "re2" and r.target == target:
            for tr in r.plan.translations:
                pats += [tr.unicode, tr.loose_unicode] if tr.boundary else [tr.unicode]
    return tuple(dict.fromkeys(pats))


def _options():
    """RE2 options of every set and pattern: ``SET_MAX_MEM``, no logging (a failure is returned)."""
    import re2

    opts = re2.Options()
    opts.max_mem = SET_MAX_MEM
    opts.log_errors = False
    return opts


def _build_set(patterns: tuple[str, ...]):
    import re2

    s = re2.Set.SearchSet(_options())
    for p in patterns:
        s.Add(p)
    s.Compile()
    return s


# An unanchored ``re2.Set`` of ``patterns``, compiled once per process; ``Match(bytes)`` returns the
# indices of every pattern the text matches, or None (``_set.Match``, the binding under it: a list,
# empty for None, without the wrapper's type check — 0.35 µs per text).
compiled_set = functools.lru_cache(maxsize=16)(_build_set)


def set_error(patterns: tuple[str, ...]) -> str | None:
    """None when ``patterns`` compile as one RE2 set, else why not (the check at load; not cached)."""
    import re2

    try:
        _build_set(patterns)
    except re2.error as e:
        return str(e)[:200]
    return None


# ---------------------------------------------------------------------------------------------
# execution


class Side:
    """One side (chosen or rejected) of a batch: the columns the rules read.

    ``prompts`` / ``responses``: ``pyarrow`` string arrays (no nulls) as stored; a rule reads a
    conversation prompt as its last user turn (``trace_ray.chat.last_user_turn``, as
    ``Policy.check``), computed for the rows that hold one. ``active``: bool mask of the rows to
    judge. ``meta``: a struct array of the side's typed metadata fields (:func:`parse_side_meta`) or
    None (meta rules then run row-wise); ``meta_row(i)``: row i's metadata dict for the row-wise
    fallback. ``answers``: judge answers (a list) or None.
    """

    def __init__(self, prompts, responses, active: np.ndarray, meta=None,
                 meta_row: Callable[[int], dict] | None = None, answers: Sequence | None = None):
        self.raw_prompts, self.responses, self.active = prompts, responses, active
        self.meta, self._meta_row, self.answers = meta, meta_row, answers
        self._py: dict[str, list] = {}
        self._prompts = None

    @property
    def prompts(self):
        """What the rules read as the prompt (conversations → their last user turn)."""
        if self._prompts is None:
            import pyarrow as pa

            from trace_ray.chat import last_user_turn
            from trace_ray.data.columnar import holding

            convo = np.flatnonzero(holding(self.raw_prompts, "[{"))
            if convo.size:
                texts = self.raw_prompts.to_pylist()
                for i in convo.tolist():
                    texts[i] = last_user_turn(texts[i])
                self._prompts = pa.array(texts, pa.string())
            else:
                self._prompts = self.raw_prompts
        return self._prompts

    def text(self, target: str, i: int) -> str:
        if target != "prompt":
            return self._py["responses"][i] if "responses" in self._py else self.responses[i].as_py()
        if self._prompts is not None:
            return self._prompts[i].as_py()
        from trace_ray.chat import last_user_turn

        return last_user_turn(self.raw_prompts[i].as_py())

    def meta_row(self, i: int) -> dict:
        return self._meta_row(i) if self._meta_row is not None else {}

    def rowwise(self, rule: Rule, rows, state: np.ndarray, info: dict) -> None:
        """``decide`` on the given rows (the reference logic), into ``state`` / ``info``."""
        if len(rows) > len(state) // 8:  # many rows: convert the responses to Python once
            self._py.setdefault("responses", self.responses.to_pylist())
        reads_prompt = isinstance(rule, CallableRule) or (isinstance(rule, RegexRule) and rule.target == "prompt")
        for i in rows:
            i = int(i)
            answer = self.answers[i] if self.answers is not None else None
            prompt = self.text("prompt", i) if reads_prompt else ""  # other rules never read it
            s, text = decide(rule, prompt, self.text("response", i), self.meta_row(i), answer)
            state[i] = HIT if s == "hit" else UNDECIDED if s == "undecided" else MISS
            if s != "miss":
                info[i] = text


def check_columns(policy, side: Side) -> tuple[np.ndarray, dict[int, list[str]]]:
    """Verdict codes ``[N]`` (0 compliant, 1 non_compliant, 2 error; inactive rows 0) and the
    reasons of every non-compliant / error row, for one side of a batch (``Policy._check_one``'s
    combination, vectorised)."""
    n = len(side.active)
    states, infos = [], []
    scans = _scan(policy, side)
    for rule in policy.rules:
        state = np.zeros(n, dtype=np.int8)
        info: dict[int, str] = {}
        if rule.plan.engine == "re2":
            _re2(rule, scans[rule.target], side, state, info)
        elif rule.plan.engine == "arrow":
            _meta(rule, side, state, info)
        else:
            side.rowwise(rule, np.flatnonzero(side.active), state, info)
        state[~side.active] = MISS
        states.append(state)
        infos.append(info)
    st = np.stack(states) if states else np.zeros((0, n), dtype=np.int8)
    hit, und = (st == HIT).any(0), (st == UNDECIDED).any(0)
    if policy.mode == "any":
        nc = hit
        err = ~nc & und
    else:
        comp = (st == MISS).any(0)
        err = ~comp & und
        nc = ~comp & ~err
    codes = np.where(nc, 1, np.where(err, 2, 0)).astype(np.int8)
    codes[~side.active] = 0
    reasons: dict[int, list[str]] = {}  # per rule, in the policy's order: Python per named rule only
    named = st == np.where(codes == 1, HIT, np.where(codes == 2, UNDECIDED, -1)).astype(np.int8)
    for rule, info, rows in zip(policy.rules, infos, named):
        for i in np.flatnonzero(rows).tolist():
            text = info.get(i)
            reasons.setdefault(i, []).append(f"{rule.name}: {text}" if text else rule.name)
    return codes, reasons


@dataclass
class _Scan:
    """The policy's RE2 set run once over one target text (response or prompt) of every active row.

    ``data``, ``off``: those texts' UTF-8 (row i: ``data[off[i]:off[i + 1]]``); ``naw``: rows
    holding a non-ASCII word character; ``failed``: rows the set gave up on (its DFA ran out of
    memory: no sentinel), decided row-wise; ``hits``: per set pattern (:func:`set_patterns`), the
    rows it matches (absent: none)."""

    data: memoryview
    off: list[int]
    naw: np.ndarray
    failed: np.ndarray
    hits: dict[str, np.ndarray]

    def hit(self, pattern: str) -> np.ndarray:
        return self.hits[pattern] if pattern in self.hits else np.zeros(len(self.naw), dtype=bool)


def _scan(policy, side: Side) -> dict[str, _Scan]:
    """Every RE2 rule's patterns over every active text in ONE pass per target (an RE2 set:
    one DFA reports all the patterns a text matches)."""
    from trace_ray.data.columnar import utf8_rows

    out = {}
    n = len(side.active)
    rows = np.flatnonzero(side.active).tolist()
    for target in {r.target for r in policy.rules if r.plan.engine == "re2"}:
        texts = side.prompts if target == "prompt" else side.responses
        patterns = set_patterns(policy.rules, target)
        match = compiled_set(patterns)._set.Match  # the binding itself: a list, empty when the DFA gave up
        data, off = utf8_rows(texts)
        failed = np.zeros(n, dtype=bool)
        per: list[list[int]] = [[] for _ in patterns]
        for i in rows:
            found = match(data[off[i]: off[i + 1]])
            if not found:  # the sentinel matches every text: nothing back means the DFA gave up
                failed[i] = True
            elif len(found) > 1:
                for k in found:
                    per[k].append(i)
        hits = {}
        for pattern, hit_rows in zip(patterns[1:], per[1:]):
            if hit_rows:
                hits[pattern] = np.zeros(n, dtype=bool)
                hits[pattern][hit_rows] = True
        naw = hits.pop(patterns[1], np.zeros(n, dtype=bool))
        out[target] = _Scan(data, off, naw, failed, hits)
    return out


def _re2(rule: RegexRule, scan: _Scan, side: Side, state: np.ndarray, info: dict) -> None:
    """The set's hits of each pattern (the first pattern that matches decides, as row-wise), with
    the match text found on those rows only; rows RE2 cannot settle exactly go to ``decide``."""
    plan = rule.plan
    word = "keyword" if isinstance(rule, KeywordsRule) else "matched"
    todo = scan.failed.copy()
    if plan.boundary:  # RE2's \b is ASCII: texts with a non-ASCII word character that may match
        maybe = np.zeros(len(state), dtype=bool)
        for tr in plan.translations:
            maybe |= scan.hit(tr.loose_unicode if tr.boundary else tr.unicode)
        todo |= scan.naw & maybe
    open_ = side.active & ~todo
    for tr in plan.translations:
        hit = scan.hit(tr.unicode) & open_
        open_ &= ~hit
        if plan.superset:  # relaxed somewhere: RE2's hit is only a candidate
            todo |= hit
            continue
        find = compiled_regex(tr.unicode)
        for i in np.flatnonzero(hit).tolist():
            text = scan.data[scan.off[i]: scan.off[i + 1]]
            span = find(text)
            if span is None:  # the set and this RE2 disagree (never seen): the reference decides
                todo[i] = True
            else:
                state[i] = HIT
                info[i] = f"{word} {str(text[span[0]: span[1]], 'utf-8')[:60]!r}"
    side.rowwise(rule, np.flatnonzero(todo), state, info)


@functools.lru_cache(maxsize=256)
def compiled_regex(pattern: str) -> Callable[[Any], tuple[int, int] | None]:
    """``find(utf8_bytes)``: the byte span of group ``m`` of ``pattern``'s first match, or None.
    Compiled once per process (RE2 keeps its DFA warm across calls); google-re2's pybind object,
    called directly: its Python wrapper would decode and re-encode every text."""
    import re2
    from re2 import _re2

    rx = _re2.RE2(pattern.encode(), _options())
    if not rx.ok():
        raise re2.error(rx.error())
    unanchored, group = _re2.RE2.Anchor.UNANCHORED, dict(rx.NamedCapturingGroups()).get(b"m", 0)

    def find(text):
        spans = rx.Match(unanchored, text, 0, len(text))
        return None if spans[0][0] < 0 else spans[group]

    return find


def _mask(arr) -> np.ndarray:
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _meta(rule: MetaRule, side: Side, state: np.ndarray, info: dict) -> None:
    """Conditions in the row-wise order; a row goes row-wise as soon as a condition it reaches
    cannot be settled from the typed columns (null/missing field, NaN, ``equals``)."""
    import pyarrow.compute as pc

    active = side.active
    if side.meta is None:
        side.rowwise(rule, np.flatnonzero(active), state, info)
        return
    open_ = active.copy()  # every condition so far holds
    rowwise = np.zeros(len(state), dtype=bool)
    conds = []
    if rule.harm_category is not None:
        conds.append(("harm_category", lambda col: _any_in(col, rule.harm_category)))
    if rule.severity_at_least is not None:
        conds.append(("severity", lambda col: pc.greater_equal(col, float(rule.severity_at_least))))
    if rule.is_safe is not None:
        conds.append(("is_safe", lambda col: pc.equal(col, rule.is_safe)))
    for name, test in conds:
        col = side.meta.field(name)
        unknown = ~_mask(pc.is_valid(col))
        if name == "severity":
            unknown |= _mask(pc.is_nan(col))
        rowwise |= open_ & unknown
        open_ &= ~unknown
        open_ &= _mask(test(col))
    if rule.equals:
        rowwise |= open_
        open_[:] = False
    hits = np.flatnonzero(open_)
    state[hits] = HIT
    rowwise_rows = np.flatnonzero(rowwise | open_)  # details of hits come from the reference logic
    side.rowwise(rule, rowwise_rows, state, info)


def _any_in(lists, wanted: list[str]):
    """Per row: does the list hold any of ``wanted``? (a BooleanArray)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    hit = pc.is_in(flat, value_set=pa.array(wanted, pa.string())).to_numpy(zero_copy_only=False)
    out = np.zeros(len(lists), dtype=bool)
    np.logical_or.at(out, parents.to_numpy()[hit], True)
    return pa.array(out)


# ---------------------------------------------------------------------------------------------
# metadata columns


def meta_fields(policy) -> dict[str, Any]:
    """The typed fields the policy's meta rules read (Arrow types), or {} when it has none."""
    import pyarrow as pa

    want: dict[str, Any] = {}
    for r in policy.rules:
        if isinstance(r, MetaRule):
            if r.harm_category is not None:
                want["harm_category"] = pa.list_(pa.string())
            if r.severity_at_least is not None:
                want["severity"] = pa.float64()
            if r.is_safe is not None:
                want["is_safe"] = pa.bool_()
    return want


def parse_side_meta(meta_json, fields: dict[str, Any]):
    """The ``meta`` column (JSON text, one object per row) → ``{"chosen": struct, "rejected":
    struct}`` of the typed fields, or None when Arrow's parser refuses the batch (a mistyped value,
    a row that is not an object): the caller then decides its meta rules row-wise."""
    import io

    import pyarrow as pa
    import pyarrow.json as pj

    if not fields or len(meta_json) == 0:
        return None
    side_t = pa.struct(list(fields.items()))
    schema = pa.schema([("chosen", side_t), ("rejected", side_t)])
    text = "\n".join(meta_json.to_pylist()).encode("utf-8")
    try:
        table = pj.read_json(io.BytesIO(text), read_options=pj.ReadOptions(use_threads=False, block_size=max(1 << 20, len(text) + 1)),
                             parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != len(meta_json):
        return None
    out = {}
    for s in ("chosen", "rejected"):
        col = table.column(s).combine_chunks()
        # a null struct (no such object) reads as null fields
        out[s] = pa.StructArray.from_arrays([pc_if_null(col, f) for f in fields], names=list(fields))
    return out


def pc_if_null(struct, name: str):
    import pyarrow.compute as pc

    child = pc.struct_field(struct, name)
    return pc.if_else(pc.is_valid(struct), child, None) if struct.null_count else child


def side_meta_rows(meta_json, side: str) -> Callable[[int], dict]:
    """Row i's metadata for ``side`` as the row-wise path sees it (``meta[side]`` when a dict)."""
    cache: dict[int, dict] = {}

    def get(i: int) -> dict:
        if i not in cache:
            try:
                meta = json.loads(meta_json[i].as_py() or "{}")
            except (json.JSONDecodeError, TypeError):
                meta = {}
            m = meta.get(side) if isinstance(meta, dict) else None
            cache[i] = m if isinstance(m, dict) else {}
        return cache[i]

    return get
