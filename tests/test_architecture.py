"""The package's shape: groups that import one way, no cycles, the size limits, the public API.

The import rule, read from the code (ast, every import statement, function-local ones
included): a module may import its own group and the groups of a lower rank.

    rank 0  sampling, data, runtime, plotting   (import nothing of lpc_jax)
    rank 1  model                                (sampling)
    rank 2  evaluation                           (the groups below)
    rank 3  training                             (everything)

``lpc_jax/__init__.py`` (the public API) stands above them all.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "lpc_jax")
RANK = {"sampling": 0, "data": 0, "runtime": 0, "plotting": 0, "model": 1, "evaluation": 2, "training": 3}
MAX_FUNCTION_LINES = 80
MAX_POSITIONAL = 6
MAX_MODULE_LINES = 450


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                parts = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def group(module: str) -> str | None:
    """``lpc_jax.sampling.mala`` -> ``sampling``; ``lpc_jax`` (the face) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(path: str) -> list[tuple[int, str]]:
    """``(line, module)`` of each lpc_jax module that the file at ``path`` imports."""
    tree = ast.parse(open(path).read())
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lpc_jax"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lpc_jax":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append((node.lineno, child if child in MODULES else node.module))
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: {target for _, target in imports_of(p) if target != m} for m, p in MODULES.items()}


def violations() -> list[str]:
    """Every import of a higher group or of another group of the same rank."""
    out = []
    for module, path in sorted(MODULES.items()):
        source = group(module)
        if source is None:
            continue  # the public API
        for line, target in imports_of(path):
            dest = group(target)
            if dest == source:
                continue
            if dest is None or RANK[dest] >= RANK[source]:
                out.append(f"{os.path.relpath(path, REPO)}:{line} ({source}) imports {target} "
                           f"({dest or 'the package face'})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_known_group():
    unknown = sorted(m for m in MODULES if group(m) is not None and group(m) not in RANK)
    assert not unknown, f"modules outside the groups of RANK: {unknown}; give them a group and a rank"


def test_imports_run_one_way():
    assert violations() == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    path = os.path.join(PACKAGE, "model", "steps.py")
    fake = tmp_path / "steps.py"
    fake.write_text(open(path).read() + "\nfrom lpc_jax.training.config import Config\n")
    monkeypatch.setitem(MODULES, "lpc_jax.model.steps", str(fake))
    assert any("imports lpc_jax.training.config" in v for v in violations())


def test_no_import_cycles():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_loop_does_not_import_plotting_and_nothing_switches_the_matplotlib_backend():
    assert "lpc_jax.plotting" not in import_graph()["lpc_jax.training.loop"]
    for module, path in MODULES.items():
        assert not re.search(r"matplotlib\.use\(|import matplotlib\.pyplot|from matplotlib import pyplot", open(path).read()), module
    code = ("import matplotlib, lpc_jax.training.train, lpc_jax.training.sweep, lpc_jax.plotting; "
            "print(matplotlib.get_backend())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MPLBACKEND": "svg", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "svg"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("folder", ["lpc_jax", "experiments", "benchmarks"])
def test_size_limits(folder):
    too_long, too_many, big = [], [], []
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            text = open(path).read()
            rel = os.path.relpath(path, REPO)
            if text.count("\n") > MAX_MODULE_LINES:
                big.append(f"{rel}: {text.count(chr(10))} lines")
            for fn in _functions(ast.parse(text)):
                lines = fn.end_lineno - fn.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{fn.lineno} {fn.name}: {lines} lines")
                positional = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
                if len(positional) > MAX_POSITIONAL:
                    too_many.append(f"{rel}:{fn.lineno} {fn.name}: {len(positional)} positional parameters")
    assert (too_long, too_many, big) == ([], [], [])


def test_public_api_names_resolve_lazily():
    code = ("import sys, lpc_jax as lpc; assert 'jax' not in sys.modules, 'import lpc_jax imported jax'; "
            "missing = [n for n in lpc.__all__ if getattr(lpc, n, None) is None]; "
            "assert not missing, missing; "
            "assert callable(lpc.mala.build_kernel) and callable(lpc.langevin.init); "
            "print(lpc.__version__, len(lpc.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import lpc_jax

    with pytest.raises(AttributeError, match="no attribute 'nope'.*lpc_jax.__all__"):
        lpc_jax.nope  # noqa: B018


def test_each_sampler_has_the_kernel_interface():
    import lpc_jax as lpc

    for sampler in (lpc.langevin, lpc.mala, lpc.underdamped):
        assert callable(sampler.init) and callable(sampler.build_kernel), sampler.__name__


def _readme_example() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no ```python block after <!-- api-example -->"
    return match.group(1)


def test_readme_api_example_runs(tmp_path):
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 12, "README's API example should stay about ten lines"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples (16, 28, 28, 1)" in proc.stdout, proc.stdout
