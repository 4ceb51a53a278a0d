"""Shared helpers: devices, per-method options, and property checks reused by every method's tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradagg

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

STATEFUL = sorted(m for m, info in gradagg.methods().items() if info.stateful)
ALL = sorted(m for m in gradagg.methods() if m not in STATEFUL)  # the stateless methods
#: The methods that weight a cross-Gramian of two batches (they need cross=; tests/test_cross.py).
CROSS = sorted(m for m, info in gradagg.methods().items() if info.uses_cross)
STATEFUL = [m for m in STATEFUL if m not in CROSS]
WEIGHTINGS = [m for m in ALL if gradagg.methods()[m].weighting]
RANDOM = [m for m in ALL if gradagg.methods()[m].random]
DETERMINISTIC_WEIGHTINGS = [m for m in WEIGHTINGS if m not in RANDOM]
STATELESS = [m for m in ALL if not gradagg.methods()[m].stateful]


def options_for(method: str, k: int) -> dict:
    """Options that make ``method`` valid for K tasks (only where some are required or K-bounded)."""
    if method == "constant":
        return {"weights": [float(i + 1) for i in range(k)]}
    if method == "krum":
        return {"f": max(0, min(1, k - 3)), "m": 1} if k >= 3 else None
    if method == "trimmed_mean":
        return {"trim": 1 if k >= 3 else 0}
    if method == "crmogm":  # a wrapper: its inner method (stateful inners: tests/test_crmogm.py)
        return {"inner": "upgrad"}
    return {}


def init_for(method, k: int, **kwargs):
    """``gradagg.init`` for a stateful method, with the options its state depends on (crmogm: its inner)."""
    opts = options_for(method, k) if isinstance(method, str) else None
    return gradagg.init([(method, opts)], k, **kwargs) if opts else gradagg.init(method, k, **kwargs)


def call_ok(method: str, k: int) -> bool:
    return options_for(method, k) is not None


def gram(j: torch.Tensor) -> np.ndarray:
    a = j.detach().double().cpu().numpy()
    return a @ a.T


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def assert_on_simplex(w: np.ndarray, tol: float = 1e-10) -> None:
    assert w.min() >= -tol, f"negative weight {w.min()}"
    assert abs(w.sum() - 1.0) <= tol * len(w), f"weights sum to {w.sum()}"


def assert_non_conflicting(j: np.ndarray, d: np.ndarray, rtol: float = 1e-7, w: np.ndarray | None = None) -> None:
    """J d ≥ −tol: tol is rtol ‖g_i‖‖d‖ plus the accuracy floor of d = Σ w_j g_j, which is
    1e-9 Σ_j |w_j| ‖g_j‖ (the solvers' 1e-10 regularisation over a few terms, and at least
    1e-12 max_j ‖g_j‖)."""
    jd = j @ d
    norms = np.linalg.norm(j, axis=1)
    floor = max(1e-12 * norms.max(), 0.0 if w is None else 1e-9 * (np.abs(w) * norms).sum())
    tol = norms * (rtol * np.linalg.norm(d) + floor) + 1e-300
    assert (jd >= -tol).all(), f"J d = {jd} conflicts (tol {tol})"


def assert_close_direction(a: np.ndarray, b: np.ndarray, rtol: float, floor: float = 0.0) -> None:
    """‖a − b‖ ≤ rtol max(‖a‖, ‖b‖) + floor (the floor covers answers that are 0 up to rounding)."""
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    assert np.linalg.norm(a - b) <= rtol * scale + floor + 1e-300, f"‖a − b‖ = {np.linalg.norm(a - b)} vs scale {scale}"


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched (a Triton operator shows as one op); ``banned()`` lists
    those that read a tensor on the host or check a factorisation there (the ``_ex`` forms do not)."""

    BANNED = ("_local_scalar_dense", "aten.item", "is_nonzero", "aten.equal", "eigh", "svd", "linalg_inv.",
              "linalg_cholesky.", "linalg_solve.", "linalg_lstsq", "linalg_pinv", "matrix_rank")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def banned(self) -> list[str]:
        return [op for op in self.ops
                if op.startswith("aten.") and any(b in op for b in self.BANNED) and "_ex" not in op]


def losses_for(method, k: int, device="cpu") -> dict:
    """``losses=`` for the methods that need the task losses (else nothing)."""
    if isinstance(method, str) and gradagg.methods()[method].uses_losses:
        return {"losses": torch.linspace(0.5, 2.0, k, dtype=torch.float64, device=device)}
    return {}
