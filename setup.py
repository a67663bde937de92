"""Install entry for tooling that expects setup.py; metadata lives in pyproject.toml."""

import setuptools

setuptools.setup()
