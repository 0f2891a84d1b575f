"""quantkit's modules import one another in one direction: no cycles, counting imports made
inside functions too (a lazy import hides a cycle from Python, not from the reader). The
package facade ``quantkit/__init__.py`` is left out: it re-exports the API and every module
lives under it. Registries hold their entries (passes/__init__ -> passes/*, export ->
io/<target>); entries never import the registry back."""

import ast
from pathlib import Path

import quantkit

ROOT = Path(quantkit.__file__).parent


def _modules() -> dict:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("quantkit",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from quantkit.io import artifact` depends on the module quantkit.io.artifact
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m not in (name, "quantkit")}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {n: _imports(n, p, modules) for n, p in modules.items() if n != "quantkit"}
    assert _cycles(graph) == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_named_seams_run_one_way():
    """The two circles issue #19 named: export <-> io targets, passes <-> qat <-> recipe."""
    modules = _modules()
    deps = {n: _imports(n, modules[n], modules) for n in modules if n != "quantkit"}
    assert "quantkit.io.hf_bnb" in deps["quantkit.export"] and "quantkit.io.onnx_export" in deps["quantkit.export"]
    for target in ("quantkit.io.hf_bnb", "quantkit.io.onnx_export", "quantkit.io.onnx_embeddings"):
        assert "quantkit.export" not in deps[target], target
    assert "quantkit.passes" in deps["quantkit.recipe"]
    assert "quantkit.qat.api" not in deps["quantkit.passes.qat"] and "quantkit.recipe" not in deps["quantkit.passes.qat"]
