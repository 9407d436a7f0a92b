"""Build script. The package is pure Python plus Triton kernels compiled at run time;
metadata lives in pyproject.toml."""

from setuptools import setup

setup()
