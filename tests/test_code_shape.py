"""No function in `uhga_tf` runs over 80 lines (the clarity rounds' bar)."""

import ast

from package_modules import module_files

MAX_LINES = 80


def long_functions(source, max_lines=MAX_LINES):
    """[(name, lines)] of the functions in `source` longer than max_lines."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > max_lines
    ]


def test_long_functions_counts_lines():
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    assert long_functions("def f():\n" + body) == [("f", 81)]
    assert long_functions("def g():\n" + body[:-len("    x79 = 79\n")]) == []


def test_no_function_over_80_lines():
    found = []
    for module, path in sorted(module_files().items()):
        with open(path) as f:
            found += [(module, *item) for item in long_functions(f.read())]
    assert found == []
