"""What one call dispatches: torch ops, kernel launches and host reads, for tests and benchmarks.

    with Census() as census:
        gradagg.aggregate(jac, "mgda")
    census.total, census.launches, census.reads

A dispatch mode sees each custom operator as one op, which would hide what it runs. Census looks
inside gradagg's Triton operators (``torch.library.triton_op``): it runs their launchers under
itself, so that their own torch ops are counted, and counts each kernel launch once (the
interpreter's copies of the arguments, under ``TRITON_INTERPRET=1``, are not ops of the call).
Other gradagg operators (the opaque host-side ones) are listed in ``opaque``: the Triton route must
not reach them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch._library.custom_ops import OPDEFS
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

#: Ops that read a device value on the host (a synchronisation on an accelerator).
READS = frozenset({"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.item.default",
                   "aten.equal.default", "aten.allclose.default"})


class Census(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (torch leaves it unannotated)
        self.ops: Counter[str] = Counter()
        self.launches = 0
        self.reads: list[str] = []
        self.opaque: list[str] = []
        self._paused = 0
        self._saved: list[tuple[type[Any], Any]] = []

    @property
    def total(self) -> int:
        """Torch ops plus kernel launches."""
        return sum(self.ops.values()) + self.launches

    def __torch_dispatch__(self, func: OpOverload, types: Sequence[type], args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        name = str(func)
        if func.namespace == "gradagg":
            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:  # a Triton operator: look inside
                with self:
                    return opdef._init_fn(*args, **kwargs)
            self.opaque.append(name)
        self.ops[name] += 1
        if name in READS:
            self.reads.append(name)
        return func(*args, **kwargs)

    def __enter__(self) -> Census:
        if not self._saved:  # (re-entered from inside a Triton operator: already patched)
            launchers: tuple[type[Any], ...] = (JITFunction, InterpretedFunction)
            for cls in launchers:
                self._saved.append((cls, cls.run))
                cls.run = self._launch(cls.run)
        entered: Census = super().__enter__()  # type: ignore[no-untyped-call]  # (it returns self)
        return entered

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)  # type: ignore[no-untyped-call]
        if self._paused == 0 and not self._inside():
            for cls, run in self._saved:
                cls.run = run
            self._saved.clear()

    def _inside(self) -> bool:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        return any(mode is self for mode in _get_current_dispatch_mode_stack())

    def _launch(self, run: Any) -> Any:
        census = self

        def counted(kernel: Any, *args: Any, **kwargs: Any) -> Any:
            census.launches += 1
            census._paused += 1
            try:
                return run(kernel, *args, **kwargs)
            finally:
                census._paused -= 1

        return counted
