"""The packages' imports run one way: no module of trace_ray or serve imports, directly or through
others, a module that imports it back (issue 14 item 7: pipeline ↔ stages, train/data ↔ train/run;
report ↔ report_run and serve.state ↔ serve.models since).

Every ``import trace_ray.x`` / ``from trace_ray.x import y`` counts, also inside functions (a lazy
import is still a dependency; it only hides the cycle until run time)."""

from __future__ import annotations

import ast

from conftest import ROOT

PKGS = ("trace_ray", "serve")


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in (f for pkg in PKGS for f in (ROOT / pkg).rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith(PKGS)]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PKGS):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else resolve(node.module)
                           for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


KNOWN: list[list[str]] = []  # (preflight ↔ triage is gone: the row-wise filing lives in triage_rows)


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "trace_ray.stages" in graph["trace_ray.pipeline"]  # the orchestrator uses the stages ...
    assert "trace_ray.train.data" in graph["trace_ray.train.run"]
    assert "trace_ray.report_run" in graph["trace_ray.report"]
    assert "serve.state" in graph["serve.models"]
    assert [c for c in cycles(graph) if c not in KNOWN] == []  # ... and nothing imports back
