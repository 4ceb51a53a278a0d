"""Builds the optional C extension gradagg._kkt (the K x K solvers for CPU tensors).

Everything else is configured in pyproject.toml. Without a C compiler the build of the extension
is skipped and gradagg falls back to its torch solvers (same algorithms, slower on CPU).
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"]
setup(ext_modules=[Extension("gradagg._kkt", ["gradagg/_kkt.c"], extra_compile_args=flags, optional=True)])
