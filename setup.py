"""Builds the optional C extension gradagg._kkt (the K x K solvers for CPU tensors).

Everything else is configured in pyproject.toml. Without a C compiler the build of the extension
is skipped and gradagg falls back to its torch solvers (same algorithms, slower on CPU).

On CPython the extension uses only the limited API of Python 3.10 (the stable ABI): it is named
``_kkt.abi3.so`` (``_kkt.pyd`` on Windows, linked to python3.dll) and the wheel is tagged
``cp310-abi3-<platform>``, so one wheel per platform serves every CPython >= 3.10. Interpreters
without the stable ABI (PyPy, free-threaded CPython) get a version-specific build instead.
"""

import os
import platform
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.sdist import sdist

LIMITED_API = 0x030A0000  # Python 3.10, the oldest version gradagg supports
abi3 = platform.python_implementation() == "CPython" and not sysconfig.get_config_var("Py_GIL_DISABLED")


class Sdist(sdist):
    """The default sdist (README, pyproject.toml, setup.py, the package with _kkt.c) plus the changelog."""

    def make_distribution(self) -> None:
        if os.path.exists("CHANGELOG.md"):
            self.filelist.append("CHANGELOG.md")
        super().make_distribution()


flags = [] if sys.platform == "win32" else ["-O3", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"]
kkt = Extension(
    "gradagg._kkt",
    ["gradagg/_kkt.c"],
    extra_compile_args=flags,
    define_macros=[("Py_LIMITED_API", hex(LIMITED_API))] if abi3 else [],
    py_limited_api=abi3,
    optional=True,
)
setup(
    ext_modules=[kkt],
    cmdclass={"sdist": Sdist},
    exclude_package_data={"gradagg": ["*.c"]},  # the source is in the sdist; the wheel has the built module
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if abi3 else {},
)
