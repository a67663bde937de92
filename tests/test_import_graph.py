"""No import cycle between `uhga_tf` modules, lazy imports included.

The graph is read from the source (AST), not from `sys.modules`, so an
import inside a function counts as much as one at the top: a lazy import
hides a cycle from Python, not from a reader. An edge goes to the module
named (`from uhga_tf import codes` -> `uhga_tf.codes`); `from pkg import
name` where `name` is not a module goes to `pkg` (its `__init__`). The
implicit import of a module's parent package is not an edge: a package
`__init__` that re-exports its submodules is not a cycle.
"""

import ast

import pytest

from package_modules import module_files


def _absolute(module, node, is_package):
    """The absolute module an ImportFrom names (resolving `from . import`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    # A package's own __init__ is its level-1 base; a module's is its parent.
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module, path, modules):
    """Every uhga_tf module `module` imports, at any depth of its body."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, is_package)
            names = [
                f"{base}.{alias.name}"
                if f"{base}.{alias.name}" in modules
                else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            # `import uhga_tf.a.b` binds uhga_tf but loads uhga_tf.a.b.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph():
    """Return {module: set of uhga_tf modules it imports}."""
    modules = module_files()
    return {
        module: _imports(module, path, modules)
        for module, path in modules.items()
    }


def find_cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_find_cycles_sees_a_lazy_cycle():
    # A no-op finder would pass the real test; this one it must fail.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_includes_imports_inside_functions():
    graph = import_graph()
    # tables imports training.run only inside functions.
    assert "uhga_tf.training.run" in graph["uhga_tf.tables"]
    assert len(graph) > 50


def test_no_import_cycle_in_the_package():
    cycles = find_cycles(import_graph())
    if cycles:
        pytest.fail(
            "import cycles between uhga_tf modules (lazy imports "
            "included): " + "; ".join(" <-> ".join(c) for c in cycles)
        )


def public_constants(source):
    """{NAME: re-exported?} for module-level UPPER_CASE assignments.

    `NAME = other.NAME` (same name, taken from another module) re-exports
    one constant and is not a second definition.
    """
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if (isinstance(target, ast.Name) and target.id.isupper()
                    and not target.id.startswith("_")):
                found[target.id] = (isinstance(value, ast.Attribute)
                                    and value.attr == target.id)
    return found


def duplicate_constants(sources):
    """{NAME: [modules]} for names two modules define (not re-export)."""
    owners = {}
    for module, source in sources.items():
        for name, reexport in public_constants(source).items():
            if not reexport and name != "FLAGS":  # absl's per-command FLAGS
                owners.setdefault(name, []).append(module)
    return {name: sorted(m) for name, m in owners.items() if len(m) > 1}


def test_duplicate_constants_sees_two_definitions():
    sources = {"a": "X = (1, 2)\nY = 3\nFLAGS = 1\n",
               "b": "import a\nX = ('x',)\nY = a.Y\nFLAGS = 2\n"}
    assert public_constants(sources["b"]) == {"X": False, "Y": True,
                                              "FLAGS": False}
    assert duplicate_constants(sources) == {"X": ["a", "b"]}


def test_no_two_modules_define_the_same_public_constant():
    sources = {}
    for module, path in module_files().items():
        with open(path) as f:
            sources[module] = f.read()
    assert duplicate_constants(sources) == {}
