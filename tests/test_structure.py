"""The package's shape: its import graph has no cycle, and no module reaches into another's
underscore names. Read from the source (imports under ``TYPE_CHECKING`` count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sharded_rmsprop"

#: torch's own underscore names that torch's optimizers use as well.
TORCH_PRIVATES = {"_foreach_copy_", "_foreach_norm", "_make_wrapper_subclass", "_to_copy"}
#: and aten's operator that reads a tensor's one value (what item() dispatches to).
TORCH_PRIVATES |= {"_local_scalar_dense"}
#: and those that torch's DDP and FSDP use: the autograd engine's end-of-backward callbacks
#: and a tensor's version counter.
TORCH_PRIVATES |= {"_execution_engine", "_version"}
#: and the step post-hooks registered for every optimizer (torch.optim's own registry).
TORCH_PRIVATES |= {"_global_optimizer_post_hooks"}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imported_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports (packages re-exporting aside)."""
    package = (
        name if f"{name}.__init__" in known or name in _packages(known) else name.rsplit(".", 1)[0]
    )
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{module}.{alias.name}"
                found.add(target if target in known else module)
    return {module for module in found if module in known and module not in _packages(known)}


def _packages(known: set[str]) -> set[str]:
    return {name for name in known if any(other.startswith(f"{name}.") for other in known)}


def test_the_import_graph_has_no_cycle() -> None:
    trees = modules()
    graph = {name: imported_modules(name, tree, set(trees)) for name, tree in trees.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name) :] + [name]))
        if name in done:
            return
        for imported in graph[name]:
            visit(imported, path + [name])
        done.add(name)

    for name in graph:
        visit(name, [])
    importers = {
        name for name, imported in graph.items() if "sharded_rmsprop.optimizer" in imported
    }
    assert importers == {"sharded_rmsprop"}, "only the package imports the optimizer"


def test_no_module_uses_another_modules_underscore_names() -> None:
    reaching = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if private and not own and node.attr not in TORCH_PRIVATES:
                    reaching.append(f"{name}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and node.level:
                reaching += [
                    f"{name}:{node.lineno} imports {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
    assert not reaching, reaching
