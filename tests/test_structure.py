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


def _class_privates(cls: ast.ClassDef) -> tuple[set[str], dict[str, int]]:
    """The underscore names a class defines (methods, class attributes, ``self._x = ...``)
    and those it reads through ``self``, with a line of each."""
    defined: set[str] = set()
    used: dict[str, int] = {}
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {t.id for t in targets if isinstance(t, ast.Name)}
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id != "self" or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__"):
                continue
            if isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            else:
                used.setdefault(node.attr, node.lineno)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
            defined.add(node.target.attr)
    return defined, used


def test_a_class_reads_through_self_only_the_underscore_names_it_defines() -> None:
    """No class calls back into another through ``self`` (what mixins did: a method of one
    module's class calling the optimizer's ``self._skip_this_step``). An underscore name read
    through ``self`` is the class's own, or one its torch base classes define."""
    import sharded_rmsprop  # noqa: F401  (the modules, imported, for their classes)

    reaching = []
    for name, tree in modules().items():
        module = __import__(name, fromlist=["_"])
        for cls in [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]:
            defined, used = _class_privates(cls)
            live = getattr(module, cls.name, None)
            for base in live.__mro__[1:] if isinstance(live, type) else ():
                if base.__module__.startswith("torch"):
                    defined |= _torch_defined(base)
            for attr, line in used.items():
                if attr not in defined:
                    reaching.append(f"{name}:{line} {cls.name} reads self.{attr}")
    assert not reaching, reaching


def _torch_defined(cls: type) -> set[str]:
    """The names a torch class defines in its source (none for one defined in C)."""
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return set()
    found = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef))
    return _class_privates(found)[0]


def test_the_optimizers_public_surface_is_defined_in_its_own_class() -> None:
    """Every public member of ShardedRMSprop is torch's or defined in optimizer.py's class:
    its bases are torch's alone (no mixins)."""
    from sharded_rmsprop import ShardedRMSprop

    own = [cls for cls in ShardedRMSprop.__mro__ if cls.__module__.startswith("sharded_rmsprop")]
    assert own == [ShardedRMSprop], own
    for name in dir(ShardedRMSprop):
        if name.startswith("_"):
            continue
        home = next(cls for cls in ShardedRMSprop.__mro__ if name in vars(cls))
        assert home is ShardedRMSprop or home.__module__.startswith("torch"), (name, home)


def test_only_the_sync_strategies_ask_whether_buffers_are_host_shared() -> None:
    """Host sharing is a strategy (buffer_sync.py): no other module branches on it."""
    asking = []
    for name, tree in modules().items():
        if name == "sharded_rmsprop.buffer_sync":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.If, ast.IfExp, ast.While)):
                test = ast.unparse(node.test)
                if "host_shared" in test or "shares_host_memory" in test:
                    asking.append(f"{name}:{node.lineno} {test}")
    assert not asking, asking
