import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _no_launch_on_fake_tensors() -> None:
    """torch.compile runs each Triton operator's launcher on fake tensors to learn its outputs; a
    compiled kernel is then not launched, but the interpreter would read the fake tensors' (absent)
    data. Skip the interpreted launch there, as a real one is skipped."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    from torch._subclasses.fake_tensor import FakeTensor

    run = InterpretedFunction.run

    def run_unless_fake(self, *args, **kwargs):
        if any(isinstance(a, FakeTensor) for a in (*args, *kwargs.values())):
            return None
        return run(self, *args, **kwargs)

    InterpretedFunction.run = run_unless_fake


if os.environ.get("TRITON_INTERPRET") == "1":
    _no_launch_on_fake_tensors()

from hypothesis import HealthCheck, settings  # noqa: E402  (after TRITON_INTERPRET is chosen)

# ci: what `make test` runs, derandomised so that a run on main is reproducible; big: a deeper
# local check; fuzz: `make fuzz`, with fresh random examples every time.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=_QUIET, derandomize=True)
settings.register_profile("big", max_examples=300, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("fuzz", max_examples=2000, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
