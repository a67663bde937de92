"""The package's source files, for tests that read the code itself."""

import os

PACKAGE = "uhga_tf"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def module_files():
    """Return {dotted module name: path} for every .py file in PACKAGE."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules
