"""Ahead-of-time compilation of every kernel, without a GPU.

    python -m gradagg.solvers.gpu.aot [--sizes 8,32] [--jobs N] [module or kernel name ...]


Compiles each kernel of ``KERNELS`` with ``triton.compile`` for sm_80 and sm_90 at every padded K
(2 … 64), which catches constructs that the interpreter accepts and the compiler rejects, and runs
the bundled ``ptxas -v`` on the PTX to read the register spills. Prints one line per kernel and
exits non-zero on a failure, or on spills at K ≤ 32. Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: The modules whose ``AOT`` lists name their kernels.
MODULES = ("nnqp", "newton", "surgery", "spectral", "elementwise", "weightings", "closed")
CAPABILITIES = (80, 90)
SIZES = (2, 4, 8, 16, 32, 64)
#: Spills are an error up to this K (a 64 x 64 float64 tile per matrix cannot stay in registers).
NO_SPILL_K = 32


@dataclass
class Kernel:
    """One kernel to compile: its JIT function, argument types (``*fp64``, ``i32``, ``fp64``, …)
    by name, and constexprs as a function of the padded K (``KP`` is set for you)."""

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    warps: Callable[[int], int] | None = None  # a function of KP, default ``gpu.warps``


def kernels() -> Iterator[tuple[str, Kernel]]:
    """(name, kernel) for every entry of the modules' ``AOT`` lists; a kernel compiled in several
    variants (constexpr flags) is named with them, e.g. ``newton._barrier_kernel[NASH=True]``."""
    for name in MODULES:
        try:
            module = importlib.import_module(f"gradagg.solvers.gpu.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"gradagg.solvers.gpu.{name}":
                raise
            continue
        for kernel in module.AOT:
            flags = ",".join(f"{k}={v}" for k, v in kernel.constexprs.items() if isinstance(v, bool))
            yield f"{name}.{kernel.fn.__name__}" + (f"[{flags}]" if flags else ""), kernel


def ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(kernel: Kernel, kp: int, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) of the kernel at padded size ``kp`` for ``sm_<capability>``."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import warps

    constexprs = {"KP": kp, **{k: (v(kp) if callable(v) else v) for k, v in kernel.constexprs.items()}}
    signature = {name: ("constexpr" if name in constexprs else kind) for name, kind in kernel.signature.items()}
    num_warps = (kernel.warps or warps)(kp)
    source = triton.compiler.ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        target = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"])
        assert target is not None, "a PTX module names its target"
        arch = target.group(1)  # sm_90a for capability 90
        out = subprocess.run([ptxas(), f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", out)), default=0)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out))
    return regs, spills


def _report(task: tuple[int, int, int]) -> tuple[str, bool]:
    """One compilation (run in a worker process): its line of the report and whether it failed."""
    index, capability, kp = task
    name, kernel = list(kernels())[index]
    try:
        regs, spills = compile_one(kernel, kp, capability)
    except Exception as err:  # reported, then the exit status says it
        return f"FAIL {name} sm_{capability} K={kp}: {type(err).__name__}: {str(err)[:400]}", True
    bad = bool(spills) and kp <= NO_SPILL_K
    return f"{'FAIL' if bad else 'ok  '} {name} sm_{capability} K={kp}: {regs} registers, {spills} bytes spilled", bad


def main(argv: list[str]) -> int:
    """Arguments: ``--sizes 8,32`` (padded K), ``--jobs N`` (worker processes, default: the CPU
    count), then module or kernel names to compile only those."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    options = {"--sizes": ",".join(map(str, SIZES)), "--jobs": str(os.cpu_count() or 1)}
    rest = []
    args = iter(argv)
    for arg in args:
        if arg in options:
            options[arg] = next(args)
        else:
            rest.append(arg)
    sizes = [int(v) for v in options["--sizes"].split(",")]
    tasks = [(index, capability, kp) for index, (name, _) in enumerate(kernels())
             if not rest or any(o in name for o in rest) for capability in CAPABILITIES for kp in sizes]
    with concurrent.futures.ProcessPoolExecutor(int(options["--jobs"]),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_report, tasks))
    for line, _ in results:
        print(line)
    return 1 if any(bad for _, bad in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
