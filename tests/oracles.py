"""Independent reference solvers (numpy/scipy) for the optimisation methods."""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import lsq_linear, minimize


def mgda_enumerate(g: np.ndarray) -> np.ndarray:
    """Exact min-norm simplex point by trying every support (K ≤ 8): the KKT solution of least value."""
    k = g.shape[0]
    g = g / max(np.diag(g).max(), 1e-300)  # the minimiser is invariant to scaling G
    best, best_w = np.inf, None
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            m = np.zeros((size + 1, size + 1))
            m[:size, :size] = g[np.ix_(s, s)]
            m[:size, size] = -1.0
            m[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(m, rhs, rcond=None)[0]
            w = np.zeros(k)
            w[s] = sol[:size]
            if w.min() < -1e-12 or abs(w.sum() - 1) > 1e-9:
                continue
            w = np.clip(w, 0, None)
            w /= w.sum()
            value = w @ g @ w
            if value < best:
                best, best_w = value, w
    return best_w


def frank_wolfe_gap(g: np.ndarray, w: np.ndarray) -> float:
    """wᵀGw − min_i (Gw)_i ≥ (f(w) − f*) / 2: a certificate of optimality on the simplex."""
    gw = g @ w
    return float(w @ gw - gw.min())


def factor(g: np.ndarray) -> np.ndarray:
    """A matrix R with RᵀR = G (for least-squares oracles that need a design matrix)."""
    lam, vec = np.linalg.eigh(g)
    return (vec * np.sqrt(np.clip(lam, 0, None))).T


def dual_cone_projection(j: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin_{v ≥ lower} ‖Jᵀv‖², by bounded-variable least squares on unit rows; returns v."""
    norms = np.linalg.norm(j, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    res = lsq_linear((j / norms[:, None]).T, np.zeros(j.shape[1]), bounds=(lower * norms, np.inf), method="bvls",
                     tol=1e-15, lsmr_tol=None, max_iter=10_000)
    return res.x / norms


def cagrad_inner(g: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """SLSQP from many starts on the simplex; returns (w, value) of the best (value in G's units)."""
    k = g.shape[0]
    unit = max(np.diag(g).max(), 1e-300)
    g = g / unit  # F scales with G: solve at unit scale
    b = g.sum(1) / k
    r = c * np.sqrt(max(g.sum(), 0)) / k

    def f(w):
        return w @ b + r * np.sqrt(max(w @ g @ w, 0) + 1e-300)

    best = None
    starts = [np.full(k, 1 / k)] + [np.eye(k)[i] * 0.9 + 0.1 / k for i in range(k)]
    for w0 in starts:
        res = minimize(f, w0, method="SLSQP", bounds=[(0, 1)] * k,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                       options={"ftol": 1e-15, "maxiter": 1000})
        if best is None or res.fun < best.fun:
            best = res
    w = np.clip(best.x, 0, None)
    w /= w.sum()  # evaluate at an exactly feasible point, so the value is a true upper bound
    return w, float(f(w)) * unit
