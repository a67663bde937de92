"""No function in `uhga_tf` runs over 80 lines (the clarity rounds' bar)."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                    "uhga_tf")
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
    for directory, _, files in os.walk(ROOT):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path) as f:
                    found += [(os.path.relpath(path, ROOT), *item)
                              for item in long_functions(f.read())]
    assert found == []
