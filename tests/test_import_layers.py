"""The import graph of engine/ and kernels/, read with ast: no cycle, and no arrow from a lower
layer to a higher one (executor -> distributed -> worker -> runner -> models -> layers ->
kernels; the leaf modules below everything but kernels), so the old circle cannot come back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels")

# Lower number = lower layer; a module may import only modules at its own layer or below.
# Modules not named here are the engine's own bookkeeping (scheduler, sampler, loader...): they
# sit between the models and the runner.
LEAVES = {"engine.config", "engine.parallel_state", "engine.forward_context"}
TOP = {"engine", "engine.llm_engine", "engine.llm", "engine.async_engine"}
RANKS = {"engine.model_runner": 5, "engine.worker": 6, "engine.distributed": 7, "engine.executor": 8}


def layer_of(module: str) -> int:
    if module.startswith("kernels"):
        return 0
    if module in LEAVES:
        return 1
    if module.startswith("engine.layers"):
        return 2
    if module.startswith("engine.models"):
        return 3
    if module in TOP:
        return 9
    return RANKS.get(module, 4)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(source: str, modules: set[str]) -> set[str]:
    """Every engine/kernels module a file imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from engine.models import registry` imports engine.models.registry; `from
            # engine.layers.linear import Linear` imports engine.layers.linear.
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): internal_imports(p.read_text(), modules) - {module_name(p)} for p in files}


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {dep}" for m, deps in graph.items() for dep in deps if layer_of(dep) > layer_of(m))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_points_up_a_layer():
    assert upward_arrows(import_graph()) == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_checker_sees_an_upward_arrow_and_a_cycle():
    """The rules themselves can fail: a layer importing a model, and two modules importing each other."""
    modules = {"engine.models.llama", "engine.layers.linear", "engine.sampler", "engine.scheduler"}
    source = "from engine.models.llama import LlamaForCausalLM\n\ndef f():\n    import engine.sampler\n"
    imports = internal_imports(source, modules)
    assert imports == {"engine.models.llama", "engine.sampler"}
    assert upward_arrows({"engine.layers.linear": imports}) == [
        "engine.layers.linear -> engine.models.llama", "engine.layers.linear -> engine.sampler"
    ]
    graph = {"engine.sampler": {"engine.scheduler"}, "engine.scheduler": {"engine.sampler"}}
    assert find_cycle(graph) == ["engine.sampler", "engine.scheduler", "engine.sampler"]


def test_transformers_does_not_take_our_kernels_package_for_hugging_faces():
    """Hugging Face's `kernels` distribution has our kernels/ package's import name. transformers
    5.25 requires it and imports it when it is installed, which then loads ours and fails:
    pyproject.toml keeps transformers below 5.25."""
    import kernels
    from transformers.utils.import_utils import is_kernels_available

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    assert not is_kernels_available(), "transformers would import our kernels/ package as Hugging Face's `kernels`"
